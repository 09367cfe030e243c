/**
 * LoRA configuration: the subset of Hugging Face PEFT 0.21's LoraConfig that webtune trains, with
 * PEFT's field names, defaults and checks, so that a config reads the same in both and the
 * adapter_config.json written from it is the one PEFT writes.
 *
 * Supported: r, lora_alpha, lora_dropout, target_modules (a list matched exactly or as a suffix
 * after a '.', a regex that must match the whole module name, 'all-linear', or null for PEFT's
 * default of the model type), use_rslora, init_lora_weights (true, 'gaussian', false),
 * rank_pattern, alpha_pattern, layers_to_transform, layers_pattern, task_type.
 * Fixed: bias 'none', modules_to_save null, use_dora false (PEFT's other values are refused with
 * a LoraConfigError); fan_in_fan_out is derived from the adapted modules as PEFT does (true for
 * GPT-2's Conv1D layers, false for nn.Linear), whatever is given.
 */
import { LoraConfigError } from './errors.js';
import { pythonRegex } from './python.js';

export type LoraTargetModules = readonly string[] | string | null;
export type LoraInit = boolean | 'gaussian';
export type LoraTaskType = 'CAUSAL_LM' | null;

export interface LoraConfig {
  /** Rank of A [r, in] and B [out, r] (PEFT default 8). */
  readonly r: number;
  /** Scale numerator: scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (default 8). */
  readonly lora_alpha: number;
  /** Dropout probability on the LoRA input, in [0, 1) (default 0). */
  readonly lora_dropout: number;
  /** Which modules get an adapter (default null: PEFT's table for the model type). */
  readonly target_modules: LoraTargetModules;
  /** Rank-stabilised scale alpha / sqrt(r) (default false). */
  readonly use_rslora: boolean;
  /** true: A Kaiming-uniform (a = sqrt 5), B = 0; 'gaussian': A ~ N(0, 1/r^2), B = 0; false: A and B
   * as nn.Linear initialises them (Kaiming-uniform on their own fan-in). Default true. */
  readonly init_lora_weights: LoraInit;
  /** Per-module rank: key = regex matched against the end of the module name after a '.', first
   * matching key in insertion order wins (default {}). */
  readonly rank_pattern: Readonly<Record<string, number>>;
  /** Per-module alpha, matched like rank_pattern (default {}). */
  readonly alpha_pattern: Readonly<Record<string, number>>;
  /** Only these layer indices (default null: all). Not with a regex target_modules. */
  readonly layers_to_transform: number | readonly number[] | null;
  /** Name(s) of the layer list the index follows ('layers', 'h'); needs layers_to_transform. */
  readonly layers_pattern: string | readonly string[] | null;
  readonly bias: 'none';
  /** Derived when targets are resolved: true when the (last) adapted module is a Conv1D. */
  readonly fan_in_fan_out: boolean;
  readonly modules_to_save: null;
  readonly use_dora: false;
  /** PEFT's task_type. webtune's default is 'CAUSAL_LM' (PEFT's is null, which makes
   * save_pretrained write an auto_mapping instead). */
  readonly task_type: LoraTaskType;
}

/** What a caller may pass: any subset of the fields, checked by validateLoraConfig. */
export type LoraConfigInput = { readonly [K in keyof LoraConfig]?: unknown };

export const LORA_CONFIG_DEFAULTS: LoraConfig = Object.freeze({
  r: 8,
  lora_alpha: 8,
  lora_dropout: 0,
  target_modules: null,
  use_rslora: false,
  init_lora_weights: true,
  rank_pattern: Object.freeze({}),
  alpha_pattern: Object.freeze({}),
  layers_to_transform: null,
  layers_pattern: null,
  bias: 'none',
  fan_in_fan_out: false,
  modules_to_save: null,
  use_dora: false,
  task_type: 'CAUSAL_LM',
});

/** PEFT's "all-linear" shorthand (compared case-insensitively, as PEFT does). */
export const ALL_LINEAR = 'all-linear';

/** PEFT 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (utils/constants.py): the
 * target_modules used when none are given, by config.json's model_type. */
export const PEFT_DEFAULT_TARGET_MODULES: Readonly<Record<string, readonly string[] | string>> = Object.freeze({
  t5: ['q', 'v'],
  mt5: ['q', 'v'],
  bart: ['q_proj', 'v_proj'],
  gpt2: ['c_attn'],
  bloom: ['query_key_value'],
  'blip-2': ['q', 'v', 'q_proj', 'v_proj'],
  opt: ['q_proj', 'v_proj'],
  gptj: ['q_proj', 'v_proj'],
  gpt_neox: ['query_key_value'],
  gpt_neo: ['q_proj', 'v_proj'],
  bert: ['query', 'value'],
  roberta: ['query', 'value'],
  'xlm-roberta': ['query', 'value'],
  electra: ['query', 'value'],
  'deberta-v2': ['query_proj', 'value_proj'],
  deberta: ['in_proj'],
  layoutlm: ['query', 'value'],
  llama: ['q_proj', 'v_proj'],
  llama4: ['q_proj', 'v_proj'],
  chatglm: ['query_key_value'],
  gpt_bigcode: ['c_attn'],
  mpt: ['Wqkv'],
  RefinedWebModel: ['query_key_value'],
  RefinedWeb: ['query_key_value'],
  falcon: ['query_key_value'],
  btlm: ['c_proj', 'c_attn'],
  codegen: ['qkv_proj'],
  mistral: ['q_proj', 'v_proj'],
  mixtral: ['q_proj', 'v_proj'],
  stablelm: ['q_proj', 'v_proj'],
  phi: ['q_proj', 'v_proj', 'fc1', 'fc2'],
  gemma: ['q_proj', 'v_proj'],
  gemma2: ['q_proj', 'v_proj'],
  gemma3_text: ['q_proj', 'v_proj'],
  gemma4: '.*language_model\\..*\\.(q_proj|v_proj)',
  qwen2: ['q_proj', 'v_proj'],
  qwen3: ['q_proj', 'v_proj'],
  nemotron_h: ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
  rwkv: ['key', 'value', 'receptance', 'output'],
  rwkv7: ['r_proj', 'k_proj', 'v_proj', 'o_proj', 'key', 'value'],
});

/** init_lora_weights values PEFT knows and webtune does not implement. */
const PEFT_ONLY_INITS = ['eva', 'olora', 'pissa', 'corda', 'loftq', 'orthogonal', 'lora_ga', 'mica'];

const FIELDS = Object.keys(LORA_CONFIG_DEFAULTS) as (keyof LoraConfig)[];

function describe(value: unknown): string {
  if (value === undefined) return 'undefined';
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean' || value === null) return String(value);
  try {
    return JSON.stringify(value);
  } catch {
    return typeof value;
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** True when the target string is PEFT's 'all-linear' shorthand. */
export function isAllLinear(target: LoraTargetModules): target is string {
  return typeof target === 'string' && target.toLowerCase() === ALL_LINEAR;
}

function checkRegex(field: string, pattern: string, mode: 'fullmatch' | 'pattern-key' | 'layers'): void {
  try {
    if (mode === 'fullmatch') pythonRegex(pattern, 'fullmatch');
    else pythonRegex(pattern, 'match', (s) => `(.*\\.)?(${s})$`);
  } catch (error) {
    throw new LoraConfigError(
      field,
      `${JSON.stringify(pattern)} is not a regular expression webtune can run (${(error as Error).message}); ` +
        'patterns are Python `re` syntax, translated for named groups (?P<name>...), \\A, \\Z and leading (?i)/(?s)/(?m)',
      { cause: error },
    );
  }
}

function checkPatternMap(
  field: 'rank_pattern' | 'alpha_pattern',
  value: unknown,
  check: (v: unknown) => boolean,
  what: string,
): Record<string, number> {
  if (value === null) return {};
  if (!isPlainObject(value)) {
    throw new LoraConfigError(field, `must be an object {pattern: ${what}}, got ${describe(value)}`);
  }
  const out: Record<string, number> = {};
  for (const [key, v] of Object.entries(value)) {
    if (key === '') throw new LoraConfigError(field, 'a key is the empty string');
    if (!check(v))
      throw new LoraConfigError(field, `the value for ${JSON.stringify(key)} is ${describe(v)}; it must be ${what}`);
    checkRegex(field, key, 'pattern-key');
    out[key] = v as number;
  }
  return out;
}

const isPositiveInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v > 0;
const isLayerIndex = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
const isPositiveNumber = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v) && v > 0;

/**
 * Fills PEFT's defaults (and webtune's task_type 'CAUSAL_LM') into `input` and checks every field.
 * Throws LoraConfigError naming the field, the value and what is allowed; unknown fields are
 * errors too (a misspelt field would otherwise be silently ignored).
 */
export function validateLoraConfig(input: unknown = {}): LoraConfig {
  if (!isPlainObject(input)) throw new LoraConfigError('(config)', `must be an object, got ${describe(input)}`);
  for (const key of Object.keys(input)) {
    if (!(FIELDS as string[]).includes(key)) {
      throw new LoraConfigError(key, `is not a LoraConfig field webtune knows; the fields are ${FIELDS.join(', ')}`);
    }
  }
  const get = <K extends keyof LoraConfig>(key: K): unknown =>
    input[key] === undefined ? LORA_CONFIG_DEFAULTS[key] : input[key];

  const r = get('r');
  if (!isPositiveInt(r)) {
    throw new LoraConfigError('r', `\`r\` should be a positive integer value but the value passed is ${describe(r)}`);
  }
  const loraAlpha = get('lora_alpha');
  if (!isPositiveNumber(loraAlpha)) {
    throw new LoraConfigError('lora_alpha', `must be a finite number > 0, got ${describe(loraAlpha)}`);
  }
  const dropout = get('lora_dropout');
  if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1)) {
    throw new LoraConfigError('lora_dropout', `must be a probability in [0, 1), got ${describe(dropout)}`);
  }

  const target = get('target_modules');
  let targetModules: LoraTargetModules;
  if (target === null) {
    targetModules = null;
  } else if (typeof target === 'string') {
    if (target === '')
      throw new LoraConfigError('target_modules', 'is the empty string (a regex that matches nothing)');
    if (!isAllLinear(target)) checkRegex('target_modules', target, 'fullmatch');
    targetModules = target;
  } else if (Array.isArray(target)) {
    if (target.length === 0) {
      // PEFT's NoMatchingPeftModuleError for target_modules=[] (it expects target_parameters then).
      throw new LoraConfigError(
        'target_modules',
        'No `target_modules` passed but also no `target_parameters` found. Please check the values for these ' +
          'arguments. (webtune does not support target_parameters: give module names, a regex, or "all-linear".)',
      );
    }
    for (const t of target) {
      if (typeof t !== 'string' || t === '') {
        throw new LoraConfigError('target_modules', `list entries must be non-empty module names, got ${describe(t)}`);
      }
    }
    targetModules = Object.freeze([...new Set(target as string[])]);
  } else {
    throw new LoraConfigError(
      'target_modules',
      `must be a list of module names, a regex string, "all-linear" or null, got ${describe(target)}`,
    );
  }

  const useRslora = get('use_rslora');
  if (typeof useRslora !== 'boolean')
    throw new LoraConfigError('use_rslora', `must be true or false, got ${describe(useRslora)}`);

  const init = get('init_lora_weights');
  if (init !== true && init !== false && init !== 'gaussian') {
    const peftOnly =
      typeof init === 'string' && PEFT_ONLY_INITS.some((p) => init.toLowerCase().startsWith(p))
        ? ` (${JSON.stringify(init)} is a PEFT initialisation webtune does not implement)`
        : '';
    throw new LoraConfigError(
      'init_lora_weights',
      `must be true, "gaussian" or false, got ${describe(init)}${peftOnly}`,
    );
  }

  const rankPattern = checkPatternMap('rank_pattern', get('rank_pattern'), isPositiveInt, 'a positive integer rank');
  const alphaPattern = checkPatternMap('alpha_pattern', get('alpha_pattern'), isPositiveNumber, 'a finite alpha > 0');

  const layers = get('layers_to_transform');
  let layersToTransform: number | readonly number[] | null;
  if (layers === null) layersToTransform = null;
  else if (isLayerIndex(layers)) layersToTransform = layers;
  else if (Array.isArray(layers) && layers.every(isLayerIndex)) layersToTransform = Object.freeze([...layers]);
  else {
    throw new LoraConfigError(
      'layers_to_transform',
      `must be a layer index, a list of layer indices (integers >= 0) or null, got ${describe(layers)}`,
    );
  }

  const lp = get('layers_pattern');
  let layersPattern: string | readonly string[] | null;
  if (lp === null) layersPattern = null;
  else if (typeof lp === 'string') layersPattern = lp;
  else if (Array.isArray(lp) && lp.every((p) => typeof p === 'string')) layersPattern = Object.freeze([...lp]);
  else throw new LoraConfigError('layers_pattern', `must be a string, a list of strings or null, got ${describe(lp)}`);
  for (const p of layersPattern === null ? [] : typeof layersPattern === 'string' ? [layersPattern] : layersPattern) {
    if (p !== '') checkRegex('layers_pattern', p, 'layers');
  }

  // PEFT's LoraConfig.__post_init__ checks, with its messages.
  if (typeof targetModules === 'string' && layersToTransform !== null) {
    throw new LoraConfigError(
      'layers_to_transform',
      '`layers_to_transform` cannot be used when `target_modules` is a str.',
    );
  }
  if (typeof targetModules === 'string' && layersPattern !== null) {
    throw new LoraConfigError('layers_pattern', '`layers_pattern` cannot be used when `target_modules` is a str.');
  }
  if (layersPattern !== null && layersPattern.length > 0 && layersToTransform === null) {
    throw new LoraConfigError(
      'layers_pattern',
      'When `layers_pattern` is specified, `layers_to_transform` must also be specified. ',
    );
  }

  const bias = get('bias');
  if (bias !== 'none') {
    throw new LoraConfigError(
      'bias',
      `must be "none", got ${describe(bias)} (PEFT's "all" and "lora_only" train the base biases, which webtune keeps frozen)`,
    );
  }
  const fanInFanOut = get('fan_in_fan_out');
  if (typeof fanInFanOut !== 'boolean') {
    throw new LoraConfigError('fan_in_fan_out', `must be true or false, got ${describe(fanInFanOut)}`);
  }
  const modulesToSave = get('modules_to_save');
  if (modulesToSave !== null) {
    throw new LoraConfigError(
      'modules_to_save',
      `must be null, got ${describe(modulesToSave)} (webtune trains only LoRA matrices, not full copies of modules)`,
    );
  }
  const useDora = get('use_dora');
  if (useDora !== false) {
    throw new LoraConfigError('use_dora', `must be false, got ${describe(useDora)} (webtune does not implement DoRA)`);
  }
  const taskType = get('task_type');
  if (taskType !== 'CAUSAL_LM' && taskType !== null) {
    throw new LoraConfigError('task_type', `must be "CAUSAL_LM" or null, got ${describe(taskType)}`);
  }

  return Object.freeze({
    r,
    lora_alpha: loraAlpha,
    lora_dropout: dropout,
    target_modules: targetModules,
    use_rslora: useRslora,
    init_lora_weights: init,
    rank_pattern: Object.freeze(rankPattern),
    alpha_pattern: Object.freeze(alphaPattern),
    layers_to_transform: layersToTransform,
    layers_pattern: layersPattern,
    bias: 'none',
    fan_in_fan_out: fanInFanOut,
    modules_to_save: null,
    use_dora: false,
    task_type: taskType,
  });
}

/** The LoRA scale for one module: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's update_layer). */
export function loraScale(alpha: number, r: number, useRslora: boolean): number {
  return useRslora ? alpha / Math.sqrt(r) : alpha / r;
}
