/**
 * PEFT adapter folders, out and in, as PEFT 0.21's PeftModel.save_pretrained writes them:
 *
 * adapter_config.json  json.dumps(LoraConfig.to_dict(), indent=2, sort_keys=True), no trailing
 *                      newline; every field of PEFT 0.21's LoraConfig (those webtune does not use at
 *                      their defaults), inference_mode true, target_modules as resolved (a list in
 *                      sorted order; PEFT's own order follows Python's string hashes and changes
 *                      from run to run), peft_version "0.21.0" (PEFT writes its installed version;
 *                      webtune writes the version whose format it reproduces), auto_mapping only
 *                      when task_type is null.
 * adapter_model.safetensors
 *                      metadata {"format": "pt"}; per adapted module
 *                      base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]
 *                      (GPT-2's Conv1D too: only PEFT's merged delta is transposed), F32.
 *
 * Reading checks an adapter against the base model: the config is parsed (unknown fields are
 * reported as warnings, like PEFT's "Unexpected keyword arguments"; a missing peft_type or r, a
 * peft_type other than LORA, or a feature webtune does not implement is an error), its targets are
 * resolved on the model's module list, and every tensor must belong to an adapted module and have
 * that module's shape.
 */
import {
  decodeToFloat32,
  type FloatDType,
  isFloatDType,
  type ModelSource,
  parseSafetensorsHeader,
  SafetensorsError,
  type SerializableTensor,
  serializeSafetensors,
} from '@webtune/models';
import { type LoraConfig, loraScale, validateLoraConfig } from './config.js';
import { AdapterFormatError, AdapterMismatchError, LoraConfigError } from './errors.js';
import type { LoraWeights } from './init.js';
import { PyFloat, type PyJson, pyJsonDumps } from './python.js';
import {
  type AdaptedModule,
  type ModelModule,
  PEFT_KEY_PREFIX,
  type ResolvedLora,
  resolveLoraTargets,
} from './targets.js';

export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
/** The PEFT version whose adapter_config.json webtune writes (its `peft_version`). */
export const PEFT_VERSION = '0.21.0';
/** The safetensors metadata PEFT writes. */
export const ADAPTER_METADATA: Readonly<Record<string, string>> = Object.freeze({ format: 'pt' });

export interface AdapterConfigOptions {
  /** base_model_name_or_path: the model id or path the adapter was trained on (null when unknown). */
  readonly baseModelNameOrPath: string | null;
  /** revision of the base model (default null). */
  readonly revision?: string | null;
  /** peft_version (default PEFT_VERSION). */
  readonly peftVersion?: string;
  /** Needed only when task_type is null: PEFT then writes auto_mapping {base_model_class,
   * parent_library}. Give them, or the model's architecture and model_type to derive them. */
  readonly autoMapping?: { readonly base_model_class: string; readonly parent_library: string };
  readonly architecture?: string;
  readonly modelType?: string;
}

/** PEFT's auto_mapping for a transformers class: {base_model_class: 'LlamaForCausalLM',
 * parent_library: 'transformers.models.llama.modeling_llama'}. */
export function autoMappingFor(
  architecture: string,
  modelType: string,
): { base_model_class: string; parent_library: string } {
  const mod = modelType.replaceAll('-', '_');
  return { base_model_class: architecture, parent_library: `transformers.models.${mod}.modeling_${mod}` };
}

const pyNumber = (v: number): PyJson => (Number.isInteger(v) ? v : new PyFloat(v));

/** The dict PEFT's LoraConfig.to_dict() gives after save_pretrained set its fields, with Python
 * floats marked (lora_dropout is always a float; an integral alpha is written as an int). */
export function adapterConfigObject(resolved: ResolvedLora, options: AdapterConfigOptions): Record<string, PyJson> {
  const c = resolved.config;
  let autoMapping: PyJson = null;
  if (c.task_type === null) {
    const am =
      options.autoMapping ??
      (options.architecture !== undefined && options.modelType !== undefined
        ? autoMappingFor(options.architecture, options.modelType)
        : undefined);
    if (am === undefined) {
      throw new LoraConfigError(
        'task_type',
        'is null, so adapter_config.json needs auto_mapping: pass autoMapping, or architecture and modelType',
      );
    }
    autoMapping = { base_model_class: am.base_model_class, parent_library: am.parent_library };
  }
  const pattern = (p: Readonly<Record<string, number>>): PyJson =>
    Object.fromEntries(Object.entries(p).map(([k, v]) => [k, pyNumber(v)]));
  return {
    alora_invocation_tokens: null,
    alpha_pattern: pattern(c.alpha_pattern),
    arrow_config: null,
    auto_mapping: autoMapping,
    base_model_name_or_path: options.baseModelNameOrPath,
    bias: c.bias,
    corda_config: null,
    ensure_weight_tying: false,
    eva_config: null,
    exclude_modules: null,
    fan_in_fan_out: c.fan_in_fan_out,
    inference_mode: true,
    init_lora_weights: c.init_lora_weights,
    kasa_config: null,
    layer_replication: null,
    layers_pattern:
      c.layers_pattern === null || typeof c.layers_pattern === 'string' ? c.layers_pattern : [...c.layers_pattern],
    layers_to_transform:
      c.layers_to_transform === null || typeof c.layers_to_transform === 'number'
        ? c.layers_to_transform
        : [...c.layers_to_transform],
    loftq_config: {},
    lora_alpha: pyNumber(c.lora_alpha),
    lora_bias: false,
    lora_dropout: new PyFloat(c.lora_dropout),
    lora_ga_config: null,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    monteclora_config: null,
    peft_type: 'LORA',
    peft_version: options.peftVersion ?? PEFT_VERSION,
    qalora_group_size: 16,
    r: c.r,
    rank_pattern: pattern(c.rank_pattern),
    revision: options.revision ?? null,
    target_modules:
      c.target_modules === null || typeof c.target_modules === 'string' ? c.target_modules : [...c.target_modules],
    target_parameters: null,
    task_type: c.task_type,
    trainable_token_indices: null,
    use_bdlora: null,
    use_dora: false,
    use_qalora: false,
    use_rslora: c.use_rslora,
    velora_config: null,
  };
}

/** The text of adapter_config.json, as PEFT's save_pretrained writes it for the same adapter. */
export function adapterConfigJson(resolved: ResolvedLora, options: AdapterConfigOptions): string {
  return pyJsonDumps(adapterConfigObject(resolved, options), { indent: 2, sortKeys: true });
}

/** The tensors of adapter_model.safetensors: lora_A [r, in] and lora_B [out, r] of every adapted
 * module, from `weights` (by module name). */
export function adapterTensors(
  resolved: ResolvedLora,
  weights: ReadonlyMap<string, LoraWeights>,
  dtype: FloatDType = 'F32',
): SerializableTensor[] {
  const out: SerializableTensor[] = [];
  for (const m of resolved.modules) {
    const w = weights.get(m.name);
    if (w === undefined) throw new AdapterMismatchError(m.name, 'no A/B weights were given for this adapted module');
    const check = (what: string, data: Float32Array, shape: readonly [number, number]) => {
      if (data.length !== shape[0] * shape[1]) {
        throw new AdapterMismatchError(
          m.name,
          `${what} holds ${data.length} values, the module's shape [${shape.join(', ')}] needs ${shape[0] * shape[1]}`,
        );
      }
    };
    check('lora_A', w.a, m.aShape);
    check('lora_B', w.b, m.bShape);
    out.push({ name: m.keyA, dtype, shape: m.aShape, data: w.a });
    out.push({ name: m.keyB, dtype, shape: m.bShape, data: w.b });
  }
  for (const name of weights.keys()) {
    if (!resolved.modules.some((m) => m.name === name)) {
      throw new AdapterMismatchError(name, 'weights were given for a module that the configuration does not adapt');
    }
  }
  return out;
}

/** adapter_model.safetensors bytes (F32 by default), byte-identical to PEFT's for the same values. */
export function adapterSafetensors(
  resolved: ResolvedLora,
  weights: ReadonlyMap<string, LoraWeights>,
  dtype: FloatDType = 'F32',
): Uint8Array {
  return serializeSafetensors(adapterTensors(resolved, weights, dtype), ADAPTER_METADATA);
}

/** Both files of a PEFT adapter folder. */
export function exportPeftAdapter(
  resolved: ResolvedLora,
  weights: ReadonlyMap<string, LoraWeights>,
  options: AdapterConfigOptions,
): { readonly [ADAPTER_CONFIG_FILE]: string; readonly [ADAPTER_WEIGHTS_FILE]: Uint8Array } {
  return {
    [ADAPTER_CONFIG_FILE]: adapterConfigJson(resolved, options),
    [ADAPTER_WEIGHTS_FILE]: adapterSafetensors(resolved, weights),
  };
}

// ---------------------------------------------------------------------------------------------
// llama.cpp

/**
 * The same adapter for consumers that ignore use_rslora (llama.cpp computes alpha / r): with
 * rsLoRA, each module's alpha becomes alpha * sqrt(r), so that alpha' / r = alpha / sqrt(r), and
 * use_rslora becomes false; the tensors are unchanged. llama.cpp reads one lora_alpha for the whole
 * adapter, so every module must come out with the same alpha' (true unless rank_pattern /
 * alpha_pattern give modules different alpha * sqrt(r)); otherwise this is a LoraConfigError.
 * alpha_pattern is emptied (its effect is in the single alpha'). Without rsLoRA, returns `resolved`.
 */
export function llamaCppCompatible(resolved: ResolvedLora): ResolvedLora {
  const c = resolved.config;
  if (!c.use_rslora) return resolved;
  const alphas = resolved.modules.map((m) => m.alpha * Math.sqrt(m.r));
  const alpha = alphas[0] as number;
  const tolerance = 1e-12 * Math.abs(alpha);
  const odd = resolved.modules.find((_, i) => Math.abs((alphas[i] as number) - alpha) > tolerance);
  if (odd !== undefined) {
    throw new LoraConfigError(
      'use_rslora',
      `llama.cpp applies one lora_alpha to every module, but alpha * sqrt(r) is ${alpha} for "${resolved.modules[0]?.name}" ` +
        `and ${odd.alpha * Math.sqrt(odd.r)} for "${odd.name}" (rank_pattern / alpha_pattern): this rsLoRA adapter ` +
        'cannot be expressed for llama.cpp',
    );
  }
  const config: LoraConfig = Object.freeze({
    ...c,
    lora_alpha: alpha,
    alpha_pattern: Object.freeze({}),
    use_rslora: false,
  });
  return {
    config,
    modules: resolved.modules.map((m) => ({ ...m, alpha, scale: loraScale(alpha, m.r, false) })),
    warnings: resolved.warnings,
  };
}

// ---------------------------------------------------------------------------------------------
// Reading

/** Every field of PEFT 0.21's LoraConfig.to_dict() (plus runtime_config, which PEFT drops). */
const PEFT_LORA_FIELDS = new Set([
  'alora_invocation_tokens',
  'alpha_pattern',
  'arrow_config',
  'auto_mapping',
  'base_model_name_or_path',
  'bias',
  'corda_config',
  'ensure_weight_tying',
  'eva_config',
  'exclude_modules',
  'fan_in_fan_out',
  'inference_mode',
  'init_lora_weights',
  'kasa_config',
  'layer_replication',
  'layers_pattern',
  'layers_to_transform',
  'loftq_config',
  'lora_alpha',
  'lora_bias',
  'lora_dropout',
  'lora_ga_config',
  'megatron_config',
  'megatron_core',
  'modules_to_save',
  'monteclora_config',
  'peft_type',
  'peft_version',
  'qalora_group_size',
  'r',
  'rank_pattern',
  'revision',
  'runtime_config',
  'target_modules',
  'target_parameters',
  'task_type',
  'trainable_token_indices',
  'use_bdlora',
  'use_dora',
  'use_qalora',
  'use_rslora',
  'velora_config',
]);

/** PEFT fields webtune does not implement: each must hold one of these "off" values. */
const OFF_VALUES: Readonly<Record<string, readonly unknown[]>> = {
  alora_invocation_tokens: [null],
  arrow_config: [null],
  corda_config: [null],
  eva_config: [null],
  exclude_modules: [null, '', []],
  kasa_config: [null],
  layer_replication: [null],
  loftq_config: [null, {}],
  lora_bias: [false],
  lora_ga_config: [null],
  megatron_config: [null],
  monteclora_config: [null],
  target_parameters: [null, []],
  trainable_token_indices: [null],
  use_bdlora: [null],
  use_qalora: [false],
};

const isOff = (value: unknown, allowed: readonly unknown[]) =>
  allowed.some((a) =>
    Array.isArray(a)
      ? Array.isArray(value) && value.length === 0
      : typeof a === 'object' && a !== null
        ? typeof value === 'object' && value !== null && !Array.isArray(value) && Object.keys(value).length === 0
        : value === a,
  );

export interface ParsedAdapterConfig {
  /** The configuration (fields webtune uses), validated. */
  readonly config: LoraConfig;
  readonly baseModelNameOrPath: string | null;
  readonly revision: string | null;
  /** The PEFT version that wrote the file (undefined when the file does not say). */
  readonly peftVersion: string | undefined;
  /** Fields the file has that PEFT 0.21 does not know, and other harmless oddities. */
  readonly warnings: readonly string[];
}

/** Parses and checks adapter_config.json text. */
export function parseAdapterConfig(text: string): ParsedAdapterConfig {
  const fail = (item: string | undefined, reason: string, cause?: unknown): never => {
    throw new AdapterFormatError(ADAPTER_CONFIG_FILE, item, reason, cause === undefined ? undefined : { cause });
  };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    return fail(undefined, `not valid JSON (${(error as Error).message})`, error);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) return fail(undefined, 'not a JSON object');
  const obj = json as Record<string, unknown>;
  const warnings: string[] = [];

  if (!Object.hasOwn(obj, 'peft_type'))
    fail('peft_type', 'missing (PEFT requires it; a LoRA adapter has "peft_type": "LORA")');
  if (obj.peft_type !== 'LORA') {
    fail('peft_type', `is ${JSON.stringify(obj.peft_type)}; webtune reads only LoRA adapters ("LORA")`);
  }
  if (!Object.hasOwn(obj, 'r')) fail('r', 'missing (the LoRA rank)');

  const unknown = Object.keys(obj)
    .filter((k) => !PEFT_LORA_FIELDS.has(k))
    .sort();
  if (unknown.length > 0) {
    warnings.push(
      `unknown fields ${JSON.stringify(unknown)} were ignored (PEFT 0.21 does not know them either: the adapter may ` +
        'come from a newer PEFT)',
    );
  }
  if (Object.hasOwn(obj, 'runtime_config'))
    warnings.push('runtime_config was ignored (runtime settings are not saved)');
  for (const [field, allowed] of Object.entries(OFF_VALUES)) {
    if (Object.hasOwn(obj, field) && !isOff(obj[field], allowed)) {
      fail(field, `is ${JSON.stringify(obj[field])}: webtune does not support this PEFT feature`);
    }
  }

  let init = obj.init_lora_weights;
  if (typeof init === 'string' && init !== 'gaussian') {
    if (init === 'eva' || init === 'orthogonal') {
      // Both only choose starting values; the saved tensors are what counts.
      warnings.push(`init_lora_weights ${JSON.stringify(init)} only chose the starting values; read as true`);
      init = true;
    } else {
      fail(
        'init_lora_weights',
        `is ${JSON.stringify(init)}: this PEFT initialisation changes the base weights or what is trained, which webtune does not support`,
      );
    }
  }
  const taskType = obj.task_type;
  if (taskType !== undefined && taskType !== null && taskType !== 'CAUSAL_LM') {
    fail('task_type', `is ${JSON.stringify(taskType)}; webtune trains causal language models ("CAUSAL_LM")`);
  }
  const base = obj.base_model_name_or_path ?? null;
  if (base !== null && typeof base !== 'string')
    fail('base_model_name_or_path', `is ${JSON.stringify(base)}, not a string`);
  const revision = obj.revision ?? null;
  if (revision !== null && typeof revision !== 'string')
    fail('revision', `is ${JSON.stringify(revision)}, not a string`);
  const version = obj.peft_version;
  if (version !== undefined && version !== null && typeof version !== 'string') {
    fail('peft_version', `is ${JSON.stringify(version)}, not a string`);
  }

  const input: Record<string, unknown> = { task_type: taskType ?? null, init_lora_weights: init };
  for (const field of [
    'r',
    'lora_alpha',
    'lora_dropout',
    'target_modules',
    'use_rslora',
    'rank_pattern',
    'alpha_pattern',
    'layers_to_transform',
    'layers_pattern',
    'bias',
    'fan_in_fan_out',
    'modules_to_save',
    'use_dora',
  ]) {
    if (Object.hasOwn(obj, field)) input[field] = obj[field];
  }
  let config: LoraConfig;
  try {
    config = validateLoraConfig(input);
  } catch (error) {
    if (error instanceof LoraConfigError) return fail(error.field, error.reason, error);
    throw error;
  }
  return {
    config,
    baseModelNameOrPath: base as string | null,
    revision: revision as string | null,
    peftVersion: (version ?? undefined) as string | undefined,
    warnings,
  };
}

export interface ImportedAdapter extends ParsedAdapterConfig {
  /** Targets resolved on the model (config as PEFT holds it, adapted modules). */
  readonly resolved: ResolvedLora;
  /** A and B of every adapted module, as f32. */
  readonly weights: ReadonlyMap<string, LoraWeights>;
  /** The config's warnings, then the resolution's (PEFT's warnings for this config on this model). */
  readonly warnings: readonly string[];
}

/**
 * Reads a PEFT adapter (adapter_config.json text and adapter_model.safetensors bytes) for a model
 * with the given modules and model_type. Throws AdapterFormatError for a malformed or unsupported
 * file, NoMatchingTargetError / LoraConfigError when the config selects nothing (or something
 * webtune cannot adapt) in this model, and AdapterMismatchError for a tensor of a module the model
 * does not have or that the config does not adapt, a shape that does not fit the module (naming
 * both shapes), or an adapted module without its tensors.
 */
export function importPeftAdapter(
  files: { readonly config: string; readonly safetensors: Uint8Array },
  modules: readonly ModelModule[],
  modelType: string,
): ImportedAdapter {
  const parsed = parseAdapterConfig(files.config);
  const resolved = resolveLoraTargets(parsed.config, modules, modelType);
  const header = parseSafetensorsHeader(files.safetensors, ADAPTER_WEIGHTS_FILE);
  const byName = new Map<string, AdaptedModule>(resolved.modules.map((m) => [m.name, m]));
  const modelNames = new Set(modules.map((m) => m.name));
  const found = new Map<string, { a?: Float32Array; b?: Float32Array }>();

  for (const info of header.tensors.values()) {
    const key = info.name;
    const bad = (reason: string): never => {
      throw new AdapterFormatError(ADAPTER_WEIGHTS_FILE, key, reason);
    };
    if (!key.startsWith(PEFT_KEY_PREFIX)) bad(`a LoRA tensor name starts with "${PEFT_KEY_PREFIX}"`);
    const rest = key.slice(PEFT_KEY_PREFIX.length);
    const m = /^(.+)\.(lora_A|lora_B)\.weight$/.exec(rest);
    if (m === null) {
      if (/\.lora_embedding_[AB]$/.test(rest)) bad('an embedding LoRA tensor: webtune adapts only linear layers');
      if (/\.lora_magnitude_vector(\.weight)?$/.test(rest))
        bad('a DoRA magnitude vector: webtune does not support DoRA');
      if (/\.lora_B\.bias$/.test(rest)) bad('a LoRA bias (lora_bias): webtune does not support it');
      bad(
        'not a LoRA A/B tensor (full weights such as embeddings or modules_to_save copies are not supported): ' +
          'webtune reads only <module>.lora_A.weight and <module>.lora_B.weight',
      );
    }
    const [, moduleName, which] = m as unknown as [string, string, 'lora_A' | 'lora_B'];
    const module = byName.get(moduleName);
    if (module === undefined) {
      throw new AdapterMismatchError(
        moduleName,
        modelNames.has(moduleName)
          ? 'the adapter has a tensor for this module, but its target_modules do not select it in this model'
          : 'the base model has no module of this name',
        key,
      );
    }
    const expected = which === 'lora_A' ? module.aShape : module.bShape;
    if (info.shape.length !== 2 || info.shape[0] !== expected[0] || info.shape[1] !== expected[1]) {
      throw new AdapterMismatchError(
        moduleName,
        `${which}.weight has shape [${info.shape.join(', ')}] but the model needs [${expected.join(', ')}] ` +
          `(${which === 'lora_A' ? `[r, in] with r = ${module.r}, in = ${module.inFeatures}` : `[out, r] with out = ${module.outFeatures}, r = ${module.r}`})`,
        key,
        expected,
        info.shape,
      );
    }
    if (!isFloatDType(info.dtype)) bad(`dtype ${info.dtype}: LoRA tensors must be F32, F16 or BF16`);
    let values: Float32Array;
    try {
      values = decodeToFloat32(info.dtype as FloatDType, files.safetensors.subarray(info.begin, info.end));
    } catch (error) {
      if (error instanceof SafetensorsError) throw error;
      throw new AdapterFormatError(ADAPTER_WEIGHTS_FILE, key, (error as Error).message, { cause: error });
    }
    const entry = found.get(moduleName) ?? {};
    entry[which === 'lora_A' ? 'a' : 'b'] = values;
    found.set(moduleName, entry);
  }

  const weights = new Map<string, LoraWeights>();
  for (const module of resolved.modules) {
    const entry = found.get(module.name);
    if (entry?.a === undefined || entry.b === undefined) {
      const missing = entry?.a === undefined ? module.keyA : module.keyB;
      throw new AdapterMismatchError(
        module.name,
        `the config adapts this module but ${ADAPTER_WEIGHTS_FILE} has no ${missing.endsWith('lora_A.weight') ? 'lora_A' : 'lora_B'} tensor for it`,
        missing,
      );
    }
    weights.set(module.name, { a: entry.a, b: entry.b });
  }
  return { ...parsed, resolved, weights, warnings: [...parsed.warnings, ...resolved.warnings] };
}

/** importPeftAdapter on the two files of a folder, URL or dropped files. */
export async function readPeftAdapter(
  source: ModelSource,
  modules: readonly ModelModule[],
  modelType: string,
): Promise<ImportedAdapter> {
  const config = await source.readText(ADAPTER_CONFIG_FILE);
  if (config === undefined) {
    throw new AdapterFormatError(ADAPTER_CONFIG_FILE, undefined, `not found in ${source.description}`);
  }
  const size = await source.size(ADAPTER_WEIGHTS_FILE);
  if (size === undefined) {
    const pickle = await source.size('adapter_model.bin');
    throw new AdapterFormatError(
      ADAPTER_WEIGHTS_FILE,
      undefined,
      `not found in ${source.description}` +
        (pickle === undefined
          ? ''
          : ' (there is an adapter_model.bin: webtune reads only safetensors; re-save it with safe_serialization=True)'),
    );
  }
  const safetensors = await source.readRange(ADAPTER_WEIGHTS_FILE, 0, size);
  return importPeftAdapter({ config, safetensors }, modules, modelType);
}
