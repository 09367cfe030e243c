// PEFT adapter folders in and out, against adapters saved by PEFT 0.21 (fixtures and goldens from
// tools/golden_peft_config.py): import of each fixture, byte-identical re-export of its
// adapter_model.safetensors and of its adapter_config.json text, round trips, the llama.cpp rsLoRA
// transform, and the errors for adapters that do not fit the model or use unsupported features.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  decodeToFloat32,
  directorySource,
  filesSource,
  parseSafetensorsHeader,
  serializeSafetensors,
} from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { validateLoraConfig } from '../src/lora/config.js';
import {
  AdapterFormatError,
  AdapterMismatchError,
  LoraConfigError,
  NoMatchingTargetError,
} from '../src/lora/errors.js';
import { initLoraWeights } from '../src/lora/init.js';
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  adapterConfigJson,
  adapterSafetensors,
  exportPeftAdapter,
  importPeftAdapter,
  llamaCppCompatible,
  parseAdapterConfig,
  readPeftAdapter,
} from '../src/lora/peft-format.js';
import { type ModelModule, resolveLoraTargets } from '../src/lora/targets.js';

const GOLDEN = fileURLToPath(new URL('./golden/peft-config/', import.meta.url));
const MODELS = ['tiny-llama', 'tiny-llama3', 'tiny-qwen2', 'tiny-qwen3', 'tiny-gpt2'] as const;

interface Golden {
  model_type: string;
  architectures: string[];
  base_model_name_or_path: string;
  fixture_adapter: { folder: string; config: string };
  modules: { name: string; kind: ModelModule['kind']; in?: number; out?: number; layer?: number }[];
  configs: {
    name: string;
    kwargs: Record<string, unknown>;
    adapted: { name: string }[];
    warnings: string[];
    adapter_config: string;
  }[];
}
const load = (model: string): Golden => JSON.parse(readFileSync(`${GOLDEN}${model}.json`, 'utf8'));
const modulesOf = (g: Golden): ModelModule[] =>
  g.modules.map((m) => ({
    name: m.name,
    kind: m.kind,
    ...(m.in === undefined ? {} : { inFeatures: m.in, outFeatures: m.out }),
    ...(m.layer === undefined ? {} : { layer: m.layer }),
  }));
const fixtureFiles = (model: string) => {
  const dir = `${GOLDEN}adapters/${model}/`;
  return {
    dir,
    config: readFileSync(`${dir}${ADAPTER_CONFIG_FILE}`, 'utf8'),
    safetensors: new Uint8Array(readFileSync(`${dir}${ADAPTER_WEIGHTS_FILE}`)),
  };
};

function caught(fn: () => unknown): unknown {
  try {
    fn();
  } catch (error) {
    return error;
  }
  throw new Error('expected an error');
}

/** The fixture's config as an object, with one change. */
function editedConfig(model: string, edit: (c: Record<string, unknown>) => void): string {
  const c = JSON.parse(fixtureFiles(model).config);
  edit(c);
  return JSON.stringify(c, null, 2);
}

describe.each(MODELS)('PEFT-saved adapter for %s', (model) => {
  const golden = load(model);
  const modules = modulesOf(golden);
  const files = fixtureFiles(model);
  const goldenConfig = golden.configs.find((c) => c.name === golden.fixture_adapter.config)!;

  // PEFT's warnings for this config and model (an unmatched rank_pattern key in tiny-llama's), without
  // the GPT-2 fan_in_fan_out one: the saved config already says fan_in_fan_out true.
  const peftWarnings = goldenConfig.warnings
    .map((w) => w.replace(/^[A-Za-z]+Warning: /, ''))
    .filter((w) => !w.startsWith('fan_in_fan_out'));

  it("imports: modules, config, A and B values, PEFT's warnings only", () => {
    const imported = importPeftAdapter(files, modules, golden.model_type);
    expect(imported.warnings).toEqual(peftWarnings);
    expect(imported.peftVersion).toBe('0.21.0');
    expect(imported.baseModelNameOrPath).toBe(golden.base_model_name_or_path);
    expect(imported.resolved.modules.map((m) => m.name)).toEqual(goldenConfig.adapted.map((a) => a.name));
    expect(imported.config.fan_in_fan_out).toBe(model === 'tiny-gpt2');
    const header = parseSafetensorsHeader(files.safetensors, ADAPTER_WEIGHTS_FILE);
    for (const m of imported.resolved.modules) {
      const w = imported.weights.get(m.name)!;
      for (const [key, values] of [
        [m.keyA, w.a],
        [m.keyB, w.b],
      ] as const) {
        const info = header.tensors.get(key)!;
        expect(info.dtype).toBe('F32');
        expect(values).toEqual(decodeToFloat32('F32', files.safetensors.subarray(info.begin, info.end)));
        expect(values.some((v) => v !== 0)).toBe(true);
      }
    }
  });

  it('re-exports adapter_model.safetensors byte for byte and adapter_config.json as PEFT wrote it', () => {
    const imported = importPeftAdapter(files, modules, golden.model_type);
    const bytes = adapterSafetensors(imported.resolved, imported.weights);
    expect(bytes.length).toBe(files.safetensors.length);
    expect(Buffer.from(bytes).equals(Buffer.from(files.safetensors))).toBe(true);

    const text = adapterConfigJson(imported.resolved, {
      baseModelNameOrPath: imported.baseModelNameOrPath,
      revision: imported.revision,
    });
    // PEFT's text with its target_modules list sorted (PEFT's order follows Python's string hashes).
    expect(text).toBe(goldenConfig.adapter_config);
    const ours = JSON.parse(text);
    const theirs = JSON.parse(files.config);
    if (Array.isArray(theirs.target_modules)) theirs.target_modules.sort();
    expect(ours).toEqual(theirs);
    expect(files.config.endsWith('}')).toBe(true); // no trailing newline, like ours
  });

  it('reads the folder through a ModelSource', async () => {
    const imported = await readPeftAdapter(directorySource(files.dir), modules, golden.model_type);
    expect(imported.weights.size).toBe(goldenConfig.adapted.length);
  });

  it('round-trips an adapter webtune made', () => {
    const resolved = resolveLoraTargets(
      validateLoraConfig({ ...goldenConfig.kwargs, init_lora_weights: false }),
      modules,
      golden.model_type,
    );
    const weights = initLoraWeights(resolved, 2024);
    const out = exportPeftAdapter(resolved, weights, {
      baseModelNameOrPath: golden.base_model_name_or_path,
      architecture: golden.architectures[0]!,
      modelType: golden.model_type,
    });
    const back = importPeftAdapter(
      { config: out[ADAPTER_CONFIG_FILE], safetensors: out[ADAPTER_WEIGHTS_FILE] },
      modules,
      golden.model_type,
    );
    expect(back.warnings).toEqual(peftWarnings);
    expect(back.resolved.modules).toEqual(resolved.modules);
    expect(back.config).toEqual({ ...resolved.config, init_lora_weights: false });
    for (const [name, w] of weights) {
      expect(back.weights.get(name)!.a).toEqual(w.a);
      expect(back.weights.get(name)!.b).toEqual(w.b);
    }
    expect(
      adapterConfigJson(back.resolved, {
        baseModelNameOrPath: back.baseModelNameOrPath,
        architecture: golden.architectures[0]!,
        modelType: golden.model_type,
      }),
    ).toBe(out[ADAPTER_CONFIG_FILE]);
  });
});

describe('adapter_config.json checks', () => {
  const model = 'tiny-qwen2';
  const golden = load(model);
  const modules = modulesOf(golden);
  const files = fixtureFiles(model);
  const importWith = (config: string, safetensors = files.safetensors) =>
    importPeftAdapter({ config, safetensors }, modules, golden.model_type);

  it('loads unknown fields with a warning', () => {
    const imported = importWith(
      editedConfig(model, (c) => {
        c.future_option = 3;
        c.another = null;
      }),
    );
    expect(imported.warnings).toEqual([
      'unknown fields ["another","future_option"] were ignored (PEFT 0.21 does not know them either: the adapter may come from a newer PEFT)',
    ]);
    expect(imported.weights.size).toBe(4);
  });

  it('loads a config of an older PEFT with only the basic fields', () => {
    const c = JSON.parse(files.config);
    const old = {
      peft_type: 'LORA',
      r: c.r,
      lora_alpha: c.lora_alpha,
      target_modules: c.target_modules,
      base_model_name_or_path: null,
    };
    const imported = importWith(JSON.stringify(old));
    expect(imported.warnings).toEqual([]);
    expect(imported.config.task_type).toBeNull();
    expect(imported.peftVersion).toBeUndefined();
  });

  const refused: [string, (c: Record<string, unknown>) => void, string, RegExp][] = [
    ['missing peft_type', (c) => delete c.peft_type, 'peft_type', /missing/],
    ['missing r', (c) => delete c.r, 'r', /missing/],
    ['another PEFT method', (c) => (c.peft_type = 'LOHA'), 'peft_type', /"LOHA".*only LoRA/],
    ['r = 0', (c) => (c.r = 0), 'r', /positive integer/],
    ['DoRA', (c) => (c.use_dora = true), 'use_dora', /DoRA/],
    ['modules_to_save', (c) => (c.modules_to_save = ['lm_head']), 'modules_to_save', /must be null/],
    ['bias', (c) => (c.bias = 'lora_only'), 'bias', /must be "none"/],
    ['exclude_modules', (c) => (c.exclude_modules = ['k_proj']), 'exclude_modules', /does not support/],
    ['lora_bias', (c) => (c.lora_bias = true), 'lora_bias', /does not support/],
    ['layer_replication', (c) => (c.layer_replication = [[0, 1]]), 'layer_replication', /does not support/],
    ['PiSSA', (c) => (c.init_lora_weights = 'pissa'), 'init_lora_weights', /changes the base weights/],
    ['a classifier', (c) => (c.task_type = 'SEQ_CLS'), 'task_type', /causal language models/],
    ['a bad regex', (c) => (c.target_modules = '(x'), 'target_modules', /not a regular expression/],
  ];
  for (const [name, edit, item, reason] of refused) {
    it(`refuses ${name}`, () => {
      const error = caught(() => importWith(editedConfig(model, edit)));
      expect(error).toBeInstanceOf(AdapterFormatError);
      expect((error as AdapterFormatError).file).toBe(ADAPTER_CONFIG_FILE);
      expect((error as AdapterFormatError).item).toBe(item);
      expect((error as AdapterFormatError).reason).toMatch(reason);
    });
  }

  it('refuses text that is not a JSON object', () => {
    expect(caught(() => parseAdapterConfig('{"peft_type": "LORA",'))).toBeInstanceOf(AdapterFormatError);
    expect((caught(() => parseAdapterConfig('[1]')) as Error).message).toMatch(/not a JSON object/);
  });

  it('reads eva / orthogonal initialisation as true, with a warning', () => {
    const imported = importWith(editedConfig(model, (c) => (c.init_lora_weights = 'orthogonal')));
    expect(imported.config.init_lora_weights).toBe(true);
    expect(imported.warnings[0]).toMatch(/only chose the starting values/);
  });
});

describe('adapters that do not fit the model', () => {
  it('a shape that does not fit names the module and both shapes', () => {
    // The Qwen2 fixture (hidden 56) on the tiny Llama (hidden 48): same module names, other sizes.
    const files = fixtureFiles('tiny-qwen2');
    const llama = load('tiny-llama');
    const error = caught(() => importPeftAdapter(files, modulesOf(llama), 'llama')) as AdapterMismatchError;
    expect(error).toBeInstanceOf(AdapterMismatchError);
    expect(error.module).toBe('model.layers.0.self_attn.q_proj');
    expect(error.expected).toEqual([4, 48]);
    expect(error.found).toEqual([4, 56]);
    expect(error.message).toContain('model.layers.0.self_attn.q_proj');
    expect(error.message).toContain('[4, 56]');
    expect(error.message).toContain('[4, 48]');
  });

  it('a rank that disagrees with the config is a shape error', () => {
    const files = fixtureFiles('tiny-qwen2');
    const g = load('tiny-qwen2');
    const error = caught(() =>
      importPeftAdapter({ ...files, config: editedConfig('tiny-qwen2', (c) => (c.r = 8)) }, modulesOf(g), 'qwen2'),
    ) as AdapterMismatchError;
    expect(error).toBeInstanceOf(AdapterMismatchError);
    expect(error.expected).toEqual([8, 56]);
    expect(error.found).toEqual([4, 56]);
  });

  it('target modules the model does not have: NoMatchingTargetError', () => {
    const error = caught(() => importPeftAdapter(fixtureFiles('tiny-gpt2'), modulesOf(load('tiny-llama')), 'llama'));
    expect(error).toBeInstanceOf(NoMatchingTargetError);
    expect((error as Error).message).toContain("Target modules {'c_attn'} not found in the base model.");
    expect((error as Error).message).toContain('q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj');
  });

  /** The qwen2 fixture's tensors plus / minus some. */
  function withTensors(add: { name: string; shape: number[] }[], drop: string[] = []): Uint8Array {
    const files = fixtureFiles('tiny-qwen2');
    const header = parseSafetensorsHeader(files.safetensors, ADAPTER_WEIGHTS_FILE);
    const tensors = [...header.tensors.values()]
      .filter((t) => !drop.includes(t.name))
      .map((t) => ({
        name: t.name,
        dtype: 'F32' as const,
        shape: t.shape,
        bytes: files.safetensors.subarray(t.begin, t.end),
      }));
    for (const a of add) {
      tensors.push({
        name: a.name,
        dtype: 'F32',
        shape: a.shape,
        bytes: new Uint8Array(4 * a.shape.reduce((x, y) => x * y, 1)),
      });
    }
    return serializeSafetensors(tensors, { format: 'pt' });
  }

  const g = load('tiny-qwen2');
  const modules = modulesOf(g);
  const config = fixtureFiles('tiny-qwen2').config;

  it('a tensor for a module the model does not have names it', () => {
    const key = 'base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight';
    const error = caught(() =>
      importPeftAdapter({ config, safetensors: withTensors([{ name: key, shape: [4, 56] }]) }, modules, 'qwen2'),
    ) as AdapterMismatchError;
    expect(error).toBeInstanceOf(AdapterMismatchError);
    expect(error.module).toBe('model.layers.7.self_attn.q_proj');
    expect(error.key).toBe(key);
    expect(error.message).toMatch(/base model has no module of this name/);
  });

  it('a tensor for a module the config does not select names it', () => {
    const key = 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight';
    const error = caught(() =>
      importPeftAdapter({ config, safetensors: withTensors([{ name: key, shape: [4, 56] }]) }, modules, 'qwen2'),
    ) as AdapterMismatchError;
    expect(error.module).toBe('model.layers.0.self_attn.k_proj');
    expect(error.message).toMatch(/target_modules do not select it/);
  });

  it('a missing tensor names the module', () => {
    const key = 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight';
    const error = caught(() =>
      importPeftAdapter({ config, safetensors: withTensors([], [key]) }, modules, 'qwen2'),
    ) as AdapterMismatchError;
    expect(error.module).toBe('model.layers.1.self_attn.v_proj');
    expect(error.key).toBe(key);
    expect(error.message).toMatch(/no lora_B tensor/);
  });

  const unsupported: [string, number[], RegExp][] = [
    ['base_model.model.model.embed_tokens.lora_embedding_A', [4, 512], /embedding LoRA/],
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector', [56], /DoRA/],
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias', [56], /lora_bias/],
    ['base_model.model.lm_head.weight', [512, 56], /not a LoRA A\/B tensor/],
    ['model.layers.0.self_attn.q_proj.lora_A.weight', [4, 56], /starts with "base_model.model."/],
  ];
  for (const [key, shape, reason] of unsupported) {
    it(`refuses the tensor ${key}`, () => {
      const error = caught(() =>
        importPeftAdapter({ config, safetensors: withTensors([{ name: key, shape }]) }, modules, 'qwen2'),
      ) as AdapterFormatError;
      expect(error).toBeInstanceOf(AdapterFormatError);
      expect(error.file).toBe(ADAPTER_WEIGHTS_FILE);
      expect(error.item).toBe(key);
      expect(error.reason).toMatch(reason);
    });
  }

  it('reads F16 and BF16 tensors as f32', () => {
    const files = fixtureFiles('tiny-qwen2');
    const imported = importPeftAdapter(files, modules, 'qwen2');
    for (const dtype of ['F16', 'BF16'] as const) {
      const bytes = adapterSafetensors(imported.resolved, imported.weights, dtype);
      const back = importPeftAdapter({ config, safetensors: bytes }, modules, 'qwen2');
      for (const [name, w] of imported.weights) {
        const b = back.weights.get(name)!;
        for (let i = 0; i < w.a.length; i++)
          expect(Math.abs(b.a[i]! - w.a[i]!)).toBeLessThanOrEqual(Math.abs(w.a[i]!) / 128);
      }
    }
  });

  it('a folder without adapter files', async () => {
    const empty = filesSource([new File(['{}'], 'config.json')], 'dropped files');
    await expect(readPeftAdapter(empty, modules, 'qwen2')).rejects.toThrow(
      /adapter_config.json: not found in dropped files/,
    );
    const pickle = filesSource(
      [new File([config], ADAPTER_CONFIG_FILE), new File([new Uint8Array(8)], 'adapter_model.bin')],
      'dropped files',
    );
    await expect(readPeftAdapter(pickle, modules, 'qwen2')).rejects.toThrow(
      /adapter_model.bin: webtune reads only safetensors/,
    );
  });
});

describe('llama.cpp-compatible rsLoRA', () => {
  it('alpha becomes alpha * sqrt(r), use_rslora false, every scale kept', () => {
    const g = load('tiny-llama3');
    const imported = importPeftAdapter(fixtureFiles('tiny-llama3'), modulesOf(g), 'llama');
    expect(imported.config.use_rslora).toBe(true);
    const cpp = llamaCppCompatible(imported.resolved);
    expect(cpp.config.use_rslora).toBe(false);
    expect(cpp.config.lora_alpha).toBe(16 * Math.sqrt(8));
    cpp.modules.forEach((m, i) => {
      const before = imported.resolved.modules[i]!;
      expect(m.name).toBe(before.name);
      expect(Math.abs(m.scale - before.scale)).toBeLessThanOrEqual(1e-15 * before.scale);
      expect(m.scale).toBe(m.alpha / m.r); // what llama.cpp computes
    });
    const json = JSON.parse(adapterConfigJson(cpp, { baseModelNameOrPath: null }));
    expect(json.lora_alpha).toBe(16 * Math.sqrt(8));
    expect(json.use_rslora).toBe(false);
    // Tensors unchanged.
    expect(
      Buffer.from(adapterSafetensors(cpp, imported.weights)).equals(
        Buffer.from(fixtureFiles('tiny-llama3').safetensors),
      ),
    ).toBe(true);
    // PEFT reads the result back with the same scales (alpha'/r without rsLoRA).
    const back = importPeftAdapter(
      {
        config: adapterConfigJson(cpp, { baseModelNameOrPath: null }),
        safetensors: fixtureFiles('tiny-llama3').safetensors,
      },
      modulesOf(g),
      'llama',
    );
    back.resolved.modules.forEach((m, i) => {
      expect(m.scale).toBe(cpp.modules[i]!.scale);
    });
  });

  it('leaves an adapter without rsLoRA alone; refuses per-module alphas it cannot express', () => {
    const g = load('tiny-llama');
    const plain = resolveLoraTargets(validateLoraConfig({ target_modules: ['q_proj'] }), modulesOf(g), 'llama');
    expect(llamaCppCompatible(plain)).toBe(plain);
    const mixed = resolveLoraTargets(
      validateLoraConfig({ target_modules: ['q_proj', 'v_proj'], use_rslora: true, rank_pattern: { v_proj: 4 } }),
      modulesOf(g),
      'llama',
    );
    const error = caught(() => llamaCppCompatible(mixed));
    expect(error).toBeInstanceOf(LoraConfigError);
    expect((error as Error).message).toMatch(/one lora_alpha/);
    // Different r and alpha with the same alpha * sqrt(r) are fine: r 4, alpha 8 and r 16, alpha 4.
    const same = resolveLoraTargets(
      validateLoraConfig({
        target_modules: ['q_proj', 'v_proj'],
        use_rslora: true,
        r: 4,
        lora_alpha: 8,
        rank_pattern: { v_proj: 16 },
        alpha_pattern: { v_proj: 4 },
      }),
      modulesOf(g),
      'llama',
    );
    const cpp = llamaCppCompatible(same);
    expect(cpp.config.lora_alpha).toBe(16);
    expect(cpp.config.alpha_pattern).toEqual({});
    expect(cpp.modules.map((m) => m.scale)).toEqual(same.modules.map((m) => m.scale));
  });
});

describe('export checks', () => {
  it('needs weights for every adapted module, of the right length', () => {
    const g = load('tiny-llama');
    const resolved = resolveLoraTargets(validateLoraConfig({ target_modules: ['q_proj'] }), modulesOf(g), 'llama');
    const weights = initLoraWeights(resolved, 1);
    const first = resolved.modules[0]!.name;
    const missing = new Map(weights);
    missing.delete(first);
    expect(caught(() => adapterSafetensors(resolved, missing))).toBeInstanceOf(AdapterMismatchError);
    const short = new Map(weights);
    short.set(first, { a: new Float32Array(3), b: weights.get(first)!.b });
    expect((caught(() => adapterSafetensors(resolved, short)) as Error).message).toMatch(/lora_A holds 3 values/);
    const extra = new Map(weights);
    extra.set('model.layers.0.self_attn.k_proj', weights.get(first)!);
    expect((caught(() => adapterSafetensors(resolved, extra)) as Error).message).toMatch(/does not adapt/);
  });

  it('task_type null needs the auto_mapping', () => {
    const g = load('tiny-llama');
    const resolved = resolveLoraTargets(
      validateLoraConfig({ target_modules: ['q_proj'], task_type: null }),
      modulesOf(g),
      'llama',
    );
    expect(caught(() => adapterConfigJson(resolved, { baseModelNameOrPath: null }))).toBeInstanceOf(LoraConfigError);
    const json = JSON.parse(
      adapterConfigJson(resolved, { baseModelNameOrPath: null, architecture: 'LlamaForCausalLM', modelType: 'llama' }),
    );
    expect(json.auto_mapping).toEqual({
      base_model_class: 'LlamaForCausalLM',
      parent_library: 'transformers.models.llama.modeling_llama',
    });
  });
});
