// LoRA target resolution against PEFT 0.21 (goldens from tools/golden_peft_config.py): for every tiny
// fixture model and every golden LoraConfig, the adapted modules in order with r, alpha, scale and the
// A/B shapes, fan_in_fan_out, PEFT's warnings, the adapter_config.json text and the safetensors keys;
// and PEFT's errors for configurations it refuses.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseSafetensorsHeader } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { validateLoraConfig } from '../src/lora/config.js';
import { LoraConfigError, NoMatchingTargetError } from '../src/lora/errors.js';
import { initLoraWeights } from '../src/lora/init.js';
import { adapterConfigJson, adapterSafetensors } from '../src/lora/peft-format.js';
import {
  findMinimalTargetModules,
  type ModelModule,
  patternKey,
  resolveLoraTargets,
  targetModuleMatches,
} from '../src/lora/targets.js';

const GOLDEN = fileURLToPath(new URL('./golden/peft-config/', import.meta.url));
const MODELS = ['tiny-llama', 'tiny-llama3', 'tiny-qwen2', 'tiny-qwen3', 'tiny-gpt2'] as const;

interface GoldenModule {
  name: string;
  class: string;
  kind: ModelModule['kind'];
  in?: number;
  out?: number;
  layer?: number;
}
interface GoldenConfig {
  name: string;
  kwargs: Record<string, unknown>;
  adapted: { name: string; r: number; alpha: number; scaling: number; lora_A: number[]; lora_B: number[] }[];
  fan_in_fan_out: boolean;
  warnings: string[];
  save_warnings: string[];
  adapter_config: string;
  safetensors_metadata: Record<string, string>;
  safetensors: { key: string; dtype: string; shape: number[] }[];
}
interface Golden {
  model: string;
  model_type: string;
  architectures: string[];
  base_model_name_or_path: string;
  modules: GoldenModule[];
  configs: GoldenConfig[];
  errors: { name: string; kwargs: Record<string, unknown>; error: string; message: string }[];
}

const load = (model: string): Golden => JSON.parse(readFileSync(`${GOLDEN}${model}.json`, 'utf8'));

function modulesOf(golden: Golden): ModelModule[] {
  return golden.modules.map((m) => ({
    name: m.name,
    kind: m.kind,
    ...(m.in === undefined ? {} : { inFeatures: m.in, outFeatures: m.out }),
    ...(m.layer === undefined ? {} : { layer: m.layer }),
  }));
}

/** PEFT's kwargs as our config input: PEFT's default task_type is None (webtune's is CAUSAL_LM). */
const inputOf = (kwargs: Record<string, unknown>) => ({ task_type: null, ...kwargs });

/** "UserWarning: text" -> "text". */
const stripCategory = (w: string) => w.replace(/^[A-Za-z]+Warning: /, '');

describe.each(MODELS)('%s', (model) => {
  const golden = load(model);
  const modules = modulesOf(golden);

  it('has at least 10 golden configurations and the fixture modules', () => {
    expect(golden.configs.length).toBeGreaterThanOrEqual(10);
    expect(modules.filter((m) => m.kind === 'linear' || m.kind === 'conv1d').length).toBeGreaterThan(0);
    expect(modules.filter((m) => m.kind === 'lm_head').map((m) => m.name)).toEqual(['lm_head']);
  });

  for (const g of golden.configs) {
    it(`config ${g.name}: adapted modules, r, alpha, scale, shapes, warnings`, () => {
      const resolved = resolveLoraTargets(validateLoraConfig(inputOf(g.kwargs)), modules, golden.model_type);
      expect(resolved.modules.map((m) => m.name)).toEqual(g.adapted.map((a) => a.name));
      resolved.modules.forEach((m, i) => {
        const a = g.adapted[i]!;
        expect(m.r).toBe(a.r);
        expect(m.alpha).toBe(a.alpha);
        expect(m.scale).toBe(a.scaling); // the same double: alpha / r or alpha / sqrt(r) in IEEE arithmetic
        expect([...m.aShape]).toEqual(a.lora_A);
        expect([...m.bShape]).toEqual(a.lora_B);
        expect(m.keyA).toBe(`base_model.model.${a.name}.lora_A.weight`);
        expect(m.keyB).toBe(`base_model.model.${a.name}.lora_B.weight`);
      });
      expect(resolved.config.fan_in_fan_out).toBe(g.fan_in_fan_out);
      expect(resolved.warnings).toEqual(g.warnings.map(stripCategory));
      expect(g.save_warnings).toEqual([]);
    });

    it(`config ${g.name}: adapter_config.json text and safetensors keys`, () => {
      const resolved = resolveLoraTargets(validateLoraConfig(inputOf(g.kwargs)), modules, golden.model_type);
      const text = adapterConfigJson(resolved, {
        baseModelNameOrPath: golden.base_model_name_or_path,
        architecture: golden.architectures[0]!,
        modelType: golden.model_type,
      });
      expect(text).toBe(g.adapter_config);

      const bytes = adapterSafetensors(resolved, initLoraWeights(resolved, 1));
      const header = parseSafetensorsHeader(bytes, 'adapter_model.safetensors');
      expect(header.metadata).toEqual(g.safetensors_metadata);
      expect([...header.tensors.values()].map((t) => ({ key: t.name, dtype: t.dtype, shape: [...t.shape] }))).toEqual(
        g.safetensors,
      );
    });
  }

  for (const e of golden.errors) {
    it(`refuses ${e.name} as PEFT does`, () => {
      let caught: unknown;
      try {
        resolveLoraTargets(validateLoraConfig(inputOf(e.kwargs)), modules, golden.model_type);
      } catch (error) {
        caught = error;
      }
      expect(caught).toBeInstanceOf(LoraConfigError);
      const error = caught as LoraConfigError;
      if (e.error === 'NoMatchingPeftModuleError' && e.message.startsWith('Target modules')) {
        // PEFT's message word for word, then the model's linear module names.
        expect(error).toBeInstanceOf(NoMatchingTargetError);
        const noMatch = error as NoMatchingTargetError;
        expect(noMatch.peftMessage).toBe(e.message);
        expect(
          error.message.startsWith(`LoraConfig.target_modules: ${e.message} The model's linear modules are: `),
        ).toBe(true);
        const lastNames = [
          ...new Set(
            golden.modules
              .filter((m) => m.kind === 'linear' || m.kind === 'conv1d')
              .map((m) => m.name.split('.').at(-1)!),
          ),
        ];
        expect(noMatch.linearModuleNames).toEqual(lastNames);
        for (const n of lastNames) expect(error.message).toContain(n);
      } else if (e.message.startsWith('Target module ')) {
        // PEFT prints the whole module (repr); webtune names it.
        expect(error.field).toBe('target_modules');
        expect(error.message).toMatch(/Target module "[^"]+" is not supported/);
      } else {
        // Config checks: PEFT's own sentence.
        expect(error.reason).toContain(e.message);
      }
    });
  }
});

describe('matching rules', () => {
  it('list entries match exactly or as a suffix after a dot, regexes the whole name', () => {
    const t = new Set(['q_proj', 'mlp.up_proj', 'model.layers.3.self_attn.v_proj']);
    expect(targetModuleMatches('model.layers.0.self_attn.q_proj', t)).toBe(true);
    expect(targetModuleMatches('model.layers.0.self_attn.xq_proj', t)).toBe(false);
    expect(targetModuleMatches('q_proj', t)).toBe(true);
    expect(targetModuleMatches('model.layers.0.mlp.up_proj', t)).toBe(true);
    expect(targetModuleMatches('model.layers.0.xmlp.up_proj', t)).toBe(false);
    expect(targetModuleMatches('model.layers.3.self_attn.v_proj', t)).toBe(true);
    expect(targetModuleMatches('model.layers.0.self_attn.q_proj', '.*q_proj')).toBe(true);
    expect(targetModuleMatches('model.layers.0.self_attn.q_proj', 'q_proj')).toBe(false);
    expect(targetModuleMatches('model.layers.0.self_attn.q_proj.x', '.*q_proj')).toBe(false);
    // Python's alternation inside fullmatch: the whole name must match one branch.
    expect(targetModuleMatches('a.q_proj', '.*q|.*q_proj')).toBe(true);
  });

  it('layers_to_transform uses the first number after the pattern; exact names bypass it', () => {
    const t = new Set(['c_fc', 'transformer.h.0.mlp.c_proj']);
    expect(targetModuleMatches('transformer.h.1.mlp.c_fc', t, [1])).toBe(true);
    expect(targetModuleMatches('transformer.h.0.mlp.c_fc', t, [1])).toBe(false);
    expect(targetModuleMatches('transformer.h.0.mlp.c_proj', t, [1])).toBe(true);
    expect(targetModuleMatches('model.layers.1.experts.0.c_fc', t, 1)).toBe(true);
    expect(targetModuleMatches('model.layers.1.experts.0.c_fc', t, 0)).toBe(false);
    expect(targetModuleMatches('model.layers.2.c_fc', t, [2], 'layers')).toBe(true);
    expect(targetModuleMatches('model.layers.2.c_fc', t, [2], 'h')).toBe(false);
    expect(targetModuleMatches('model.layers.2.c_fc', t, [2], ['h', 'layers'])).toBe(true);
    // An empty list means "no layer filter", as in PEFT.
    expect(targetModuleMatches('model.layers.2.c_fc', t, [])).toBe(true);
  });

  it('pattern keys: first key in insertion order whose (.*\\.)?(key)$ matches', () => {
    expect(patternKey(['q_proj', 'self_attn.q_proj'], 'model.layers.0.self_attn.q_proj')).toBe('q_proj');
    expect(patternKey(['self_attn.q_proj', 'q_proj'], 'model.layers.0.self_attn.q_proj')).toBe('self_attn.q_proj');
    expect(patternKey(['^model.layers.0.self_attn.o_proj'], 'model.layers.0.self_attn.o_proj')).toBeDefined();
    expect(patternKey(['proj'], 'model.layers.0.self_attn.o_proj')).toBeUndefined();
    expect(patternKey(['layers\\.(?P<i>1)\\..*'], 'model.layers.1.mlp.up_proj')).toBeDefined();
  });

  it("condenses long target lists as PEFT's _find_minimal_target_modules", () => {
    const targets = [...Array(30).keys()].flatMap((i) => [
      `model.decoder.layers.${i}.self_attn.q_proj`,
      `model.decoder.layers.${i}.self_attn.v_proj`,
    ]);
    const others = [...Array(30).keys()].map((i) => `model.encoder.layers.${i}.self_attn.k_proj`);
    expect(findMinimalTargetModules(targets, others)).toEqual(['q_proj', 'v_proj']);
    // Expected values from PEFT 0.21's _find_minimal_target_modules on the same lists.
    const sortPy = (xs: string[]) => xs.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const clash = [...Array(30).keys()].map((i) => `model.encoder.layers.${i}.self_attn.q_proj`);
    expect(findMinimalTargetModules(targets, clash)).toEqual(
      sortPy([...[...Array(30).keys()].map((i) => `decoder.layers.${i}.self_attn.q_proj`), 'v_proj']),
    );
    const near = [...others, 'model.decoder.layers.31.self_attn.q_proj'];
    expect(findMinimalTargetModules(targets, near)).toEqual(
      sortPy([...[...Array(30).keys()].map((i) => `${i}.self_attn.q_proj`), 'v_proj']),
    );
    expect(() => findMinimalTargetModules([], others)).toThrow(LoraConfigError);
  });

  it('refuses the embedding and the output layer, and a model type without defaults', () => {
    const modules = modulesOf(load('tiny-llama'));
    expect(() => resolveLoraTargets(validateLoraConfig({ target_modules: ['lm_head'] }), modules, 'llama')).toThrow(
      /output layer/,
    );
    expect(() =>
      resolveLoraTargets(validateLoraConfig({ target_modules: ['embed_tokens'] }), modules, 'llama'),
    ).toThrow(/token embedding/);
    expect(() => resolveLoraTargets(validateLoraConfig({}), modules, 'mystery')).toThrow(
      /Please specify `target_modules`.*q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj/,
    );
  });

  it('all-linear leaves out lm_head and every non-linear module', () => {
    const golden = load('tiny-llama3');
    const resolved = resolveLoraTargets(
      validateLoraConfig({ target_modules: 'ALL-LINEAR' }),
      modulesOf(golden),
      'llama',
    );
    expect(resolved.modules.map((m) => m.name)).toEqual(
      golden.modules.filter((m) => m.kind === 'linear').map((m) => m.name),
    );
  });
});
