/**
 * Which modules of a model get a LoRA adapter, with which rank, alpha and scale: PEFT 0.21's
 * BaseTuner.inject_adapter and LoraModel._create_and_replace, reproduced on a list of the model's
 * modules (names as Hugging Face's named_modules() gives them).
 *
 * 1. target_modules null -> PEFT's default for the model_type (PEFT_DEFAULT_TARGET_MODULES).
 * 2. 'all-linear' -> the names of every Linear / Conv1D module except the output layer (lm_head).
 * 3. A list of 20 names or more is first condensed to the shortest suffixes that still separate
 *    the targets from every other module (PEFT's _find_minimal_target_modules); this is what
 *    adapter_config.json then holds.
 * 4. A module is selected when (check_target_module_exists): target_modules is a string and it
 *    matches the whole name as a regex; or the name is in the list; or the name ends with
 *    '.' + an entry of the list and, when layers_to_transform is given, its layer index (the first
 *    number after `<layers_pattern>.`, or after the second dotted part when no pattern is given)
 *    is one of layers_to_transform. An exact name is selected whatever its layer.
 * 5. r and alpha: the first rank_pattern / alpha_pattern key (in insertion order) such that
 *    `(.*\.)?(key)$` matches the name from its start; otherwise r / lora_alpha.
 *    scale = alpha / r, or alpha / sqrt(r) with use_rslora.
 * 6. fan_in_fan_out follows the adapted modules: each Conv1D sets it to true and each Linear to
 *    false, with PEFT's warning whenever it changes.
 *
 * Selecting a module that is not a linear layer is an error (PEFT: "Target module ... is not
 * supported"); so is selecting the token embedding or the output layer, which PEFT supports but
 * saves together with the full embedding matrices, which webtune does not do.
 */
import { ShapeError } from '@webtune/core';
import { isAllLinear, type LoraConfig, loraScale, PEFT_DEFAULT_TARGET_MODULES } from './config.js';
import { LoraConfigError, NoMatchingTargetError } from './errors.js';
import { compareCodePoints, pyRepr, pySetRepr, pythonRegex } from './python.js';

export type ModelModuleKind = 'linear' | 'conv1d' | 'embedding' | 'lm_head' | 'other';

/** One module of the base model, as named_modules() lists it (the root excluded). */
export interface ModelModule {
  /** Hugging Face path: 'model.layers.0.self_attn.q_proj', 'transformer.h.0.attn.c_attn'. */
  readonly name: string;
  /** 'linear' = nn.Linear; 'conv1d' = GPT-2's Conv1D (weight stored [in, out]); 'lm_head' = the
   * output layer (get_output_embeddings()); 'other' = anything else (norms, blocks, lists). */
  readonly kind: ModelModuleKind;
  /** For linear / conv1d: input and output features (embedding: vocabulary and width). */
  readonly inFeatures?: number;
  readonly outFeatures?: number;
  /** Transformer block index, for display; matching uses the name, as PEFT does. */
  readonly layer?: number;
}

/** A module that gets an adapter. */
export interface AdaptedModule {
  readonly name: string;
  readonly kind: 'linear' | 'conv1d';
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly layer: number | undefined;
  readonly r: number;
  readonly alpha: number;
  /** alpha / r, or alpha / sqrt(r) with rsLoRA. */
  readonly scale: number;
  /** lora_A.weight: [r, in]. */
  readonly aShape: readonly [number, number];
  /** lora_B.weight: [out, r] (also for Conv1D). */
  readonly bShape: readonly [number, number];
  /** Tensor names in adapter_model.safetensors. */
  readonly keyA: string;
  readonly keyB: string;
}

export interface ResolvedLora {
  /** The configuration as PEFT holds it after injection, i.e. as adapter_config.json states it:
   * target_modules resolved (defaults filled in, 'all-linear' expanded, long lists condensed; a
   * list in sorted order) and fan_in_fan_out derived. */
  readonly config: LoraConfig;
  /** The adapted modules in model order. */
  readonly modules: readonly AdaptedModule[];
  /** PEFT's warnings for the same configuration (fan_in_fan_out changed, rank_pattern / alpha_pattern
   * keys that matched no adapted module), without the Python warning class. */
  readonly warnings: readonly string[];
}

/** PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION. */
export const MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20;

export const PEFT_KEY_PREFIX = 'base_model.model.';

/** `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. */
export function loraKeys(module: string): { keyA: string; keyB: string } {
  return { keyA: `${PEFT_KEY_PREFIX}${module}.lora_A.weight`, keyB: `${PEFT_KEY_PREFIX}${module}.lora_B.weight` };
}

type Targets = string | ReadonlySet<string>;

/** Compiled regexes of one resolution (patterns are checked once, matched against every name). */
class RegexCache {
  private readonly cache = new Map<string, RegExp>();
  get(field: string, key: string, build: () => RegExp): RegExp {
    let re = this.cache.get(key);
    if (!re) {
      try {
        re = build();
      } catch (error) {
        throw new LoraConfigError(
          field,
          `${JSON.stringify(key)} is not a regular expression webtune can run (${(error as Error).message})`,
          {
            cause: error,
          },
        );
      }
      this.cache.set(key, re);
    }
    return re;
  }
}

const DEFAULT_LAYER_INDEX = /^.*?\.[^.]*\.(?<idx>\d+)\./;

/** PEFT's check_target_module_exists (without exclude_modules / modules_to_save, which webtune does
 * not support). `targets` is a regex string or a set of names / suffixes. */
export function targetModuleMatches(
  name: string,
  targets: Targets,
  layersToTransform: LoraConfig['layers_to_transform'] = null,
  layersPattern: LoraConfig['layers_pattern'] = null,
  cache: RegexCache = new RegexCache(),
): boolean {
  if (typeof targets === 'string') {
    return cache.get('target_modules', `full:${targets}`, () => pythonRegex(targets, 'fullmatch')).test(name);
  }
  if (targets.has(name)) return true;
  let found = false;
  for (const t of targets) {
    if (name.endsWith(`.${t}`)) {
      found = true;
      break;
    }
  }
  const usingLayers =
    layersToTransform !== null && (typeof layersToTransform === 'number' || layersToTransform.length !== 0);
  if (!(usingLayers && found)) return found;
  let match: RegExpExecArray | null = null;
  if (layersPattern === null || layersPattern.length === 0) {
    match = DEFAULT_LAYER_INDEX.exec(name);
  } else {
    for (const p of typeof layersPattern === 'string' ? [layersPattern] : layersPattern) {
      const re = cache.get('layers_pattern', `layers:${p}`, () =>
        pythonRegex(`(?:^|.*?\\.)${p}\\.(?P<idx>\\d+)\\.`, 'match'),
      );
      match = re.exec(name);
      if (match !== null) break;
    }
  }
  const idx = match?.groups?.idx;
  if (idx === undefined) return false;
  const layer = Number(idx);
  return typeof layersToTransform === 'number' ? layer === layersToTransform : layersToTransform.includes(layer);
}

/** PEFT's get_pattern_key: the first key (insertion order) such that `(.*\.)?(key)$` matches the
 * name from its start, or undefined. */
export function patternKey(
  keys: readonly string[],
  name: string,
  field = 'rank_pattern',
  cache: RegexCache = new RegexCache(),
): string | undefined {
  for (const key of keys) {
    const re = cache.get(field, `key:${key}`, () => pythonRegex(key, 'match', (s) => `(.*\\.)?(${s})$`));
    if (re.test(name)) return key;
  }
  return undefined;
}

function patternValue(
  pattern: Readonly<Record<string, number>>,
  name: string,
  fallback: number,
  field: string,
  cache: RegexCache,
): number {
  const key = patternKey(Object.keys(pattern), name, field, cache) ?? name;
  return Object.hasOwn(pattern, key) ? (pattern[key] as number) : fallback;
}

/** Dotted suffixes of a name, shortest first: 'a.b.c' -> ['c', 'b.c', 'a.b.c']. */
function suffixes(name: string): string[] {
  const parts = name.split('.');
  const out: string[] = [];
  for (let i = parts.length - 1; i >= 0; i--) out.push(parts.slice(i).join('.'));
  return out;
}

function compareLists(a: readonly string[], b: readonly string[]): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const d = compareCodePoints(a[i] as string, b[i] as string);
    if (d !== 0) return d;
  }
  return a.length - b.length;
}

/** PEFT's _find_minimal_target_modules: the shortest suffixes that select every target and none of
 * `others`. Returned sorted. */
export function findMinimalTargetModules(targets: Iterable<string>, others: Iterable<string>): string[] {
  const targetSet = new Set(targets);
  if (targetSet.size === 0)
    throw new LoraConfigError('target_modules', 'target_modules should be a list or set of strings.');
  if (targetSet.has(''))
    throw new LoraConfigError('target_modules', 'target_modules should not contain an empty string.');
  const otherSet = new Set(others);
  for (const t of targetSet) {
    if (otherSet.has(t))
      throw new LoraConfigError('target_modules', `"${t}" is both a target and a module that is not targeted`);
  }
  const otherSuffixes = new Set<string>();
  for (const o of otherSet) for (const s of suffixes(o)) otherSuffixes.add(s);
  const items = [...targetSet].map((t) => [t, suffixes(t)] as const).sort((a, b) => compareLists(a[1], b[1]));
  const required = new Set<string>();
  for (const [item, itemSuffixes] of items) {
    for (const s of itemSuffixes) {
      if (required.has(s) || otherSuffixes.has(s)) continue;
      let covered = false;
      for (const req of required) {
        if (item.endsWith(`.${req}`)) {
          covered = true;
          break;
        }
      }
      if (!covered) {
        required.add(s);
        break;
      }
    }
  }
  return [...(required.size === 0 ? targetSet : required)].sort(compareCodePoints);
}

function linearNames(modules: readonly ModelModule[]): { names: string[]; example: string | undefined } {
  const names: string[] = [];
  let example: string | undefined;
  for (const m of modules) {
    if (m.kind !== 'linear' && m.kind !== 'conv1d') continue;
    example ??= m.name;
    const last = m.name.slice(m.name.lastIndexOf('.') + 1);
    if (!names.includes(last)) names.push(last);
  }
  return { names, example };
}

function checkFeatures(m: ModelModule): { inFeatures: number; outFeatures: number } {
  const ok = (v: number | undefined): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v > 0;
  if (!ok(m.inFeatures) || !ok(m.outFeatures)) {
    throw new ShapeError(
      `module "${m.name}" (${m.kind}) is selected for LoRA but has no valid inFeatures/outFeatures ` +
        `(${m.inFeatures}, ${m.outFeatures}): the module list must give them for linear and conv1d modules`,
    );
  }
  return { inFeatures: m.inFeatures, outFeatures: m.outFeatures };
}

/**
 * Resolves `config` on a model: the adapted modules with their r, alpha, scale and tensor shapes,
 * and the configuration as PEFT would save it. `modelType` is config.json's model_type (used only
 * when target_modules is null). Pass every module named_modules() lists (not just the linear ones):
 * condensing long target lists depends on the other names.
 *
 * Throws LoraConfigError (or NoMatchingTargetError, with PEFT's message and the model's linear
 * module names) when nothing matches, when a non-linear module or the embedding / output layer
 * would be adapted, or when target_modules is null for a model type PEFT has no default for.
 */
export function resolveLoraTargets(
  config: LoraConfig,
  modules: readonly ModelModule[],
  modelType: string,
): ResolvedLora {
  const cache = new RegexCache();
  const seen = new Set<string>();
  for (const m of modules) {
    if (seen.has(m.name)) throw new ShapeError(`the module list names "${m.name}" twice`);
    seen.add(m.name);
  }

  // 1-3: the target_modules PEFT ends up with.
  let targets: Targets;
  if (config.target_modules === null) {
    const fallback = Object.hasOwn(PEFT_DEFAULT_TARGET_MODULES, modelType)
      ? PEFT_DEFAULT_TARGET_MODULES[modelType]
      : undefined;
    if (fallback === undefined) {
      throw new LoraConfigError(
        'target_modules',
        `Please specify \`target_modules\` in \`peft_config\` (PEFT has no default for model_type ${JSON.stringify(modelType)}; ` +
          `the model's linear modules are: ${linearNames(modules).names.join(', ') || '(none)'})`,
      );
    }
    targets = typeof fallback === 'string' ? fallback : new Set(fallback);
  } else if (isAllLinear(config.target_modules)) {
    targets = new Set(modules.filter((m) => m.kind === 'linear' || m.kind === 'conv1d').map((m) => m.name));
  } else if (typeof config.target_modules === 'string') {
    targets = config.target_modules;
  } else {
    targets = new Set(config.target_modules);
  }
  if (typeof targets !== 'string' && targets.size >= MIN_TARGET_MODULES_FOR_OPTIMIZATION) {
    const set = targets;
    const tails = [...set].map((t) => `.${t}`);
    const others = modules
      .map((m) => m.name)
      .filter((name) => !set.has(name) && !tails.some((tail) => name.endsWith(tail)));
    const minimal = findMinimalTargetModules(set, others);
    if (minimal.length < set.size) targets = new Set(minimal);
  }
  const saved: string | readonly string[] =
    typeof targets === 'string' ? targets : [...targets].sort(compareCodePoints);

  // 4-5: match every module.
  const adapted: AdaptedModule[] = [];
  const rankKeys = Object.keys(config.rank_pattern);
  const alphaKeys = Object.keys(config.alpha_pattern);
  for (const m of modules) {
    if (m.name === '') continue;
    if (!targetModuleMatches(m.name, targets, config.layers_to_transform, config.layers_pattern, cache)) continue;
    if (m.kind === 'other') {
      throw new LoraConfigError(
        'target_modules',
        `Target module "${m.name}" is not supported: it is not a linear layer. Currently, only the following modules ` +
          "are supported: linear layers (torch.nn.Linear) and GPT-2's Conv1D. Name the linear layers inside it instead " +
          `(the model's linear modules are: ${linearNames(modules).names.join(', ')}).`,
      );
    }
    if (m.kind === 'embedding' || m.kind === 'lm_head') {
      throw new LoraConfigError(
        'target_modules',
        `"${m.name}" is the model's ${m.kind === 'lm_head' ? 'output layer' : 'token embedding'}: webtune adapts only ` +
          'the linear layers inside the transformer blocks (PEFT would also save the full embedding matrices with ' +
          'such an adapter, which webtune does not write)',
      );
    }
    const { inFeatures, outFeatures } = checkFeatures(m);
    const r = patternValue(config.rank_pattern, m.name, config.r, 'rank_pattern', cache);
    const alpha = patternValue(config.alpha_pattern, m.name, config.lora_alpha, 'alpha_pattern', cache);
    adapted.push({
      name: m.name,
      kind: m.kind,
      inFeatures,
      outFeatures,
      layer: m.layer,
      r,
      alpha,
      scale: loraScale(alpha, r, config.use_rslora),
      aShape: [r, inFeatures],
      bShape: [outFeatures, r],
      ...loraKeys(m.name),
    });
  }

  if (adapted.length === 0) {
    const empty = typeof targets === 'string' ? targets === '' : targets.size === 0;
    if (empty || modules.length === 0) {
      throw new LoraConfigError(
        'target_modules',
        modules.length === 0
          ? 'No modules were targeted for adaptation: the model lists no modules.'
          : 'No `target_modules` passed but also no `target_parameters` found. Please check the values for these arguments.',
      );
    }
    let message = `Target modules ${typeof targets === 'string' ? targets : pySetRepr(targets)} not found in the base model. Please check the target modules and try again.`;
    if (config.layers_to_transform !== null) {
      message += ` Note: You specified 'layers_to_transform': ${pyRepr(config.layers_to_transform)}.`;
    }
    if (config.layers_pattern !== null) {
      const lp = config.layers_pattern;
      message += ` You also specified 'layers_pattern': ${typeof lp === 'string' ? lp : pyRepr(lp)}.`;
    }
    const { names, example } = linearNames(modules);
    throw new NoMatchingTargetError(message, names, example);
  }

  // 6: fan_in_fan_out as PEFT's dispatch_default leaves it, with its warnings.
  const warnings: string[] = [];
  let fanInFanOut = config.fan_in_fan_out;
  for (const m of adapted) {
    if (m.kind === 'linear' && fanInFanOut) {
      warnings.push(
        'fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.',
      );
      fanInFanOut = false;
    } else if (m.kind === 'conv1d' && !fanInFanOut) {
      warnings.push(
        'fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.',
      );
      fanInFanOut = true;
    }
  }
  for (const [field, keys] of [
    ['rank_pattern', rankKeys],
    ['alpha_pattern', alphaKeys],
  ] as const) {
    if (keys.length === 0) continue;
    const unmatched = keys
      .filter((key) => !adapted.some((m) => patternKey([key], m.name, field, cache) !== undefined))
      .sort(compareCodePoints);
    if (unmatched.length > 0) {
      warnings.push(
        `The following ${field} keys did not match any targeted module and were ignored: ${pyRepr(unmatched)}.`,
      );
    }
  }

  return {
    config: Object.freeze({ ...config, target_modules: saved, fan_in_fan_out: fanInFanOut }),
    modules: adapted,
    warnings,
  };
}
