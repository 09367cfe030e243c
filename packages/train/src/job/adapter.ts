/**
 * The adapter a job continues from: its adapter_config.json parsed and checked for what the job
 * script needs (a LoRA config whose target modules are known), and the modules its
 * adapter_model.safetensors holds (read from the header: every tensor a lora_A / lora_B pair), cross-
 * checked against the ResolvedLora the trainer used when there is one. The safetensors bytes go
 * into the zip unchanged; only the header is read.
 */
import { parseSafetensorsHeader, SafetensorsError } from '@webtune/models';
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  AdapterFormatError,
  type LoraConfig,
  LoraConfigError,
  PEFT_DEFAULT_TARGET_MODULES,
  PEFT_KEY_PREFIX,
  parseAdapterConfig,
  type ResolvedLora,
} from '../lora/index.js';
import type { AdapterFiles } from '../store/types.js';
import { TrainingJobError } from './errors.js';

/** One adapted module as the weights file holds it. */
export interface JobModule {
  readonly name: string;
  readonly r: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
}

export interface JobAdapter {
  /** The configuration as adapter_config.json states it, target_modules filled in. */
  readonly config: LoraConfig;
  /** base_model_name_or_path and revision of adapter_config.json. */
  readonly baseModelNameOrPath: string | null;
  readonly revision: string | null;
  /** The adapted modules, in the order of the ResolvedLora when given, else of the file. */
  readonly modules: readonly JobModule[];
}

const KEY = /^(.+)\.lora_([AB])\.weight$/;

function configFailure(field: string | undefined, reason: string, cause?: unknown): TrainingJobError {
  const item = field === undefined ? ADAPTER_CONFIG_FILE : `${ADAPTER_CONFIG_FILE} (${field})`;
  return new TrainingJobError(item, reason, cause === undefined ? undefined : { cause });
}

function parseConfig(text: string, modelType: string): Omit<JobAdapter, 'modules'> {
  let parsed: ReturnType<typeof parseAdapterConfig>;
  try {
    parsed = parseAdapterConfig(text);
  } catch (error) {
    if (error instanceof AdapterFormatError) throw configFailure(error.item, error.reason, error);
    if (error instanceof LoraConfigError) throw configFailure(error.field, error.reason, error);
    throw error;
  }
  let config = parsed.config;
  if (config.target_modules === null) {
    // PEFT fills the default of the model type at load time; the job states it, so that a fresh
    // LoRA (train.py --fresh) and the module check need no table of defaults in Python.
    const fallback = PEFT_DEFAULT_TARGET_MODULES[modelType];
    if (fallback === undefined) {
      throw configFailure(
        'target_modules',
        `is missing and PEFT has no default target modules for model type "${modelType}"; the job script cannot tell which modules to train`,
      );
    }
    config = Object.freeze({ ...config, target_modules: fallback });
  }
  return { config, baseModelNameOrPath: parsed.baseModelNameOrPath, revision: parsed.revision };
}

function readModules(weights: Uint8Array): JobModule[] {
  let tensors: ReturnType<typeof parseSafetensorsHeader>['tensors'];
  try {
    tensors = parseSafetensorsHeader(weights, ADAPTER_WEIGHTS_FILE).tensors;
  } catch (error) {
    if (error instanceof SafetensorsError)
      throw new TrainingJobError(ADAPTER_WEIGHTS_FILE, error.message, { cause: error });
    throw error;
  }
  const pairs = new Map<string, { a?: readonly number[]; b?: readonly number[] }>();
  for (const [key, info] of tensors) {
    const match = key.startsWith(PEFT_KEY_PREFIX) ? KEY.exec(key.slice(PEFT_KEY_PREFIX.length)) : null;
    if (match === null) {
      throw new TrainingJobError(
        `${ADAPTER_WEIGHTS_FILE} (${key})`,
        `is not a LoRA tensor "${PEFT_KEY_PREFIX}<module>.lora_A.weight" / ".lora_B.weight"; the job continues LoRA adapters only`,
      );
    }
    const [, name, which] = match as unknown as [string, string, 'A' | 'B'];
    if (info.shape.length !== 2) {
      throw new TrainingJobError(
        `${ADAPTER_WEIGHTS_FILE} (${key})`,
        `has shape [${info.shape.join(', ')}], not a matrix`,
      );
    }
    const pair = pairs.get(name) ?? {};
    pair[which === 'A' ? 'a' : 'b'] = info.shape;
    pairs.set(name, pair);
  }
  if (pairs.size === 0) throw new TrainingJobError(ADAPTER_WEIGHTS_FILE, 'holds no LoRA tensors');
  return [...pairs].map(([name, { a, b }]) => {
    if (a === undefined || b === undefined) {
      throw new TrainingJobError(
        `${ADAPTER_WEIGHTS_FILE} (${name})`,
        `has lora_${a ? 'A' : 'B'} without lora_${a ? 'B' : 'A'}`,
      );
    }
    const [r, inFeatures] = a as [number, number];
    const [outFeatures, rB] = b as [number, number];
    if (rB !== r) {
      throw new TrainingJobError(`${ADAPTER_WEIGHTS_FILE} (${name})`, `lora_A has rank ${r}, lora_B has rank ${rB}`);
    }
    return { name, r, inFeatures, outFeatures };
  });
}

/** Sorted copy of a list, so that target lists compare as sets (PEFT keeps them as one). */
const canonical = (value: unknown): string =>
  JSON.stringify(Array.isArray(value) ? [...value].sort() : value, (_, v) =>
    typeof v === 'object' && v !== null && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0)))
      : v,
  );

/** Fields the job states and that must agree between adapter_config.json and the trained ResolvedLora. */
const COMPARED: readonly (keyof LoraConfig)[] = [
  'r',
  'lora_alpha',
  'lora_dropout',
  'target_modules',
  'use_rslora',
  'rank_pattern',
  'alpha_pattern',
  'layers_to_transform',
  'layers_pattern',
  'fan_in_fan_out',
  'task_type',
];

function checkAgainstResolved(adapter: JobAdapter, resolved: ResolvedLora): JobModule[] {
  for (const field of COMPARED) {
    const inFile = canonical(adapter.config[field]);
    const trained = canonical(resolved.config[field]);
    if (inFile !== trained) {
      throw configFailure(field, `is ${inFile}, but the adapter was trained with ${trained}`);
    }
  }
  const byName = new Map(adapter.modules.map((m) => [m.name, m]));
  const ordered = resolved.modules.map((m) => {
    const found = byName.get(m.name);
    if (found === undefined) {
      throw new TrainingJobError(`${ADAPTER_WEIGHTS_FILE} (${m.name})`, 'has no tensors for this trained module');
    }
    if (found.r !== m.r || found.inFeatures !== m.inFeatures || found.outFeatures !== m.outFeatures) {
      throw new TrainingJobError(
        `${ADAPTER_WEIGHTS_FILE} (${m.name})`,
        `holds r ${found.r}, ${found.inFeatures} -> ${found.outFeatures}; the trained module has r ${m.r}, ${m.inFeatures} -> ${m.outFeatures}`,
      );
    }
    return found;
  });
  if (ordered.length !== adapter.modules.length) {
    const extra = adapter.modules.find((m) => !resolved.modules.some((r) => r.name === m.name));
    throw new TrainingJobError(
      `${ADAPTER_WEIGHTS_FILE} (${extra?.name})`,
      'has tensors for a module that was not trained',
    );
  }
  return ordered;
}

/** Reads and checks the adapter a job continues from (module header). */
export function readJobAdapter(files: AdapterFiles, modelType: string, resolved?: ResolvedLora): JobAdapter {
  const parsed = parseConfig(files.config, modelType);
  const adapter: JobAdapter = { ...parsed, modules: readModules(files.weights) };
  if (resolved !== undefined) return { ...adapter, modules: checkAgainstResolved(adapter, resolved) };
  const c = adapter.config;
  if (Object.keys(c.rank_pattern).length === 0) {
    // Without per-module ranks every module has rank r; anything else means the config is not the
    // one these weights were trained with, and a fresh LoRA from it would differ.
    const odd = adapter.modules.find((m) => m.r !== c.r);
    if (odd !== undefined) {
      throw configFailure('r', `is ${c.r}, but ${ADAPTER_WEIGHTS_FILE} holds rank ${odd.r} for ${odd.name}`);
    }
  }
  return adapter;
}
