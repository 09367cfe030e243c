/**
 * job.json: everything train.py needs, in the names the Python libraries use, so that the script
 * passes each value straight to the argument of the same name:
 *
 *   lora       -> peft.LoraConfig(**lora)           (as adapter_config.json states it)
 *   training   -> trl.SFTConfig(<same names>)       (transformers' TrainingArguments + max_length)
 *
 * How webtune's settings become TrainingArguments (same semantics, checked in trainer.ts and
 * core's schedule.ts):
 * - lr, beta1, beta2, eps, weightDecay -> learning_rate, adam_beta1, adam_beta2, adam_epsilon,
 *   weight_decay: torch's AdamW, decoupled decay on every LoRA matrix (the Trainer decays all
 *   parameters but biases and norms, and LoRA has neither).
 * - maxGradNorm -> max_grad_norm; no clipping (null) -> 0, which the Trainer reads as "off".
 * - schedule kind -> lr_scheduler_type of the same name: both compute transformers'
 *   get_*_schedule(_with_warmup) through LambdaLR; 'constant' ignores warmup in both (use
 *   'constant_with_warmup' for a warmup); cosine has num_cycles 0.5 in both.
 * - warmupSteps -> warmup_steps: an integer, so transformers reads it as steps (a float below 1
 *   would be a ratio).
 * - totalSteps -> max_steps: the same number of optimizer steps and the same schedule length
 *   (num_training_steps), however the run was given (steps or epochs); epochs is kept as
 *   num_train_epochs for `train.py --epochs`-style use and is overridden by max_steps.
 * - batch, gradAccum -> per_device_train_batch_size, gradient_accumulation_steps. The loss of a
 *   step is the sum over its counted tokens divided by their number over all micro-batches, in
 *   webtune and in the Trainer (num_items_in_batch), so accumulation means the same.
 * - seq -> max_length (every example already fits; TRL's truncation is a no-op); no packing.
 * - seed -> seed: it seeds the Trainer's initialisation and data order, which are its own (webtune
 *   draws its LoRA init and shuffles with its own generator), so the order of examples differs.
 * - checkpointEvery -> save_steps (0: no checkpoints), evalEvery -> eval_steps,
 *   recompute -> gradient_checkpointing.
 */
import type { LrScheduleKind } from '@webtune/core';
import type { LoraConfig } from '../lora/index.js';
import type { JobAdapter } from './adapter.js';
import type { DataSummary } from './data.js';
import { TrainingJobError } from './errors.js';

/** The training settings of a run (RunConfig from run/config.ts has this shape). */
export interface JobTrainingConfig {
  readonly optimizer: {
    readonly lr: number;
    readonly beta1: number;
    readonly beta2: number;
    readonly eps: number;
    readonly weightDecay: number;
    /** null: no clipping. */
    readonly maxGradNorm: number | null;
  };
  readonly schedule: { readonly kind: LrScheduleKind; readonly warmupSteps: number };
  /** Optimizer steps of the run. */
  readonly totalSteps: number;
  /** Epochs over the training examples the run amounted to (informational). */
  readonly epochs?: number;
  readonly batch: number;
  readonly seq: number;
  readonly gradAccum: number;
  readonly seed: number;
  /** Default 0: no checkpoints. */
  readonly checkpointEvery?: number;
  /** Default: totalSteps. */
  readonly evalEvery?: number;
  /** Default false. */
  readonly recompute?: boolean;
}

export interface JobBaseModel {
  /** base_model_name_or_path: a Hub id, or whatever the model was loaded from (train.py --base-model overrides it). */
  readonly id: string;
  /** config.json's model_type ("llama"). */
  readonly modelType: string;
  /** config.json's architectures[0] ("LlamaForCausalLM"). */
  readonly architecture?: string;
  /** The Hub revision, when there is one. */
  readonly revision?: string | null;
}

/** peft.LoraConfig keyword arguments. */
export interface JobLoraJson {
  readonly r: number;
  readonly lora_alpha: number;
  readonly lora_dropout: number;
  readonly target_modules: readonly string[] | string;
  readonly use_rslora: boolean;
  readonly init_lora_weights: boolean | 'gaussian';
  readonly rank_pattern: Readonly<Record<string, number>>;
  readonly alpha_pattern: Readonly<Record<string, number>>;
  readonly layers_to_transform: number | readonly number[] | null;
  readonly layers_pattern: string | readonly string[] | null;
  readonly bias: 'none';
  readonly fan_in_fan_out: boolean;
  readonly task_type: 'CAUSAL_LM' | null;
}

/** trl.SFTConfig keyword arguments (see the module header). */
export interface JobTrainingJson {
  readonly learning_rate: number;
  readonly adam_beta1: number;
  readonly adam_beta2: number;
  readonly adam_epsilon: number;
  readonly weight_decay: number;
  readonly max_grad_norm: number;
  readonly lr_scheduler_type: LrScheduleKind;
  readonly warmup_steps: number;
  readonly max_steps: number;
  readonly num_train_epochs: number;
  readonly per_device_train_batch_size: number;
  readonly gradient_accumulation_steps: number;
  readonly max_length: number;
  readonly seed: number;
  readonly eval_steps: number;
  readonly save_steps: number;
  readonly gradient_checkpointing: boolean;
}

export interface TrainingJobJson {
  readonly format: 'webtune-training-job';
  readonly version: 1;
  readonly name: string;
  /** ISO time of the export. */
  readonly created: string;
  readonly base_model: {
    readonly name_or_path: string;
    readonly model_type: string;
    readonly architecture: string | null;
    readonly revision: string | null;
  };
  readonly adapter: {
    /** The PEFT adapter folder, relative to job.json. */
    readonly path: string;
    /** Optimizer steps it has been trained for. */
    readonly steps_trained: number;
    /** The adapted module paths (model order): train.py checks that LoRA lands on exactly these. */
    readonly modules: readonly string[];
  };
  readonly lora: JobLoraJson;
  readonly training: JobTrainingJson;
  readonly data: DataSummary;
}

function integer(field: string, value: unknown, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    throw new TrainingJobError(`training.${field}`, `must be an integer >= ${min}, got ${JSON.stringify(value)}`);
  }
  return value;
}

function finite(field: string, value: unknown, min: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min) {
    throw new TrainingJobError(`training.${field}`, `must be a finite number >= ${min}, got ${JSON.stringify(value)}`);
  }
  return value;
}

const SCHEDULES: readonly LrScheduleKind[] = ['constant', 'constant_with_warmup', 'linear', 'cosine'];

/** TrainingArguments for the run's settings (module header). */
export function trainingArguments(t: JobTrainingConfig): JobTrainingJson {
  const o = t.optimizer;
  if (!SCHEDULES.includes(t.schedule.kind)) {
    throw new TrainingJobError(
      'training.schedule.kind',
      `${JSON.stringify(t.schedule.kind)} is not one of ${SCHEDULES.join(', ')}`,
    );
  }
  const maxGradNorm =
    o.maxGradNorm === null || o.maxGradNorm === Infinity ? 0 : finite('optimizer.maxGradNorm', o.maxGradNorm, 0);
  const totalSteps = integer('totalSteps', t.totalSteps, 1);
  const checkpointEvery = integer('checkpointEvery', t.checkpointEvery ?? 0, 0);
  return {
    learning_rate: finite('optimizer.lr', o.lr, 0),
    adam_beta1: finite('optimizer.beta1', o.beta1, 0),
    adam_beta2: finite('optimizer.beta2', o.beta2, 0),
    adam_epsilon: finite('optimizer.eps', o.eps, 0),
    weight_decay: finite('optimizer.weightDecay', o.weightDecay, 0),
    max_grad_norm: maxGradNorm,
    lr_scheduler_type: t.schedule.kind,
    warmup_steps: integer('schedule.warmupSteps', t.schedule.warmupSteps, 0),
    max_steps: totalSteps,
    num_train_epochs: t.epochs === undefined ? 1 : finite('epochs', t.epochs, 0),
    per_device_train_batch_size: integer('batch', t.batch, 1),
    gradient_accumulation_steps: integer('gradAccum', t.gradAccum, 1),
    max_length: integer('seq', t.seq, 2),
    seed: integer('seed', t.seed, 0),
    eval_steps: integer('evalEvery', t.evalEvery ?? totalSteps, 1),
    save_steps: checkpointEvery,
    gradient_checkpointing: t.recompute ?? false,
  };
}

/** peft.LoraConfig arguments for the adapter's configuration. */
export function loraArguments(c: LoraConfig): JobLoraJson {
  if (c.target_modules === null) throw new TrainingJobError('lora.target_modules', 'is not resolved');
  const list = <T>(v: T | readonly T[] | null): T | T[] | null => (Array.isArray(v) ? [...v] : (v as T | null));
  return {
    r: c.r,
    lora_alpha: c.lora_alpha,
    lora_dropout: c.lora_dropout,
    target_modules: typeof c.target_modules === 'string' ? c.target_modules : [...c.target_modules],
    use_rslora: c.use_rslora,
    init_lora_weights: c.init_lora_weights,
    rank_pattern: { ...c.rank_pattern },
    alpha_pattern: { ...c.alpha_pattern },
    layers_to_transform: list(c.layers_to_transform),
    layers_pattern: list(c.layers_pattern),
    bias: c.bias,
    fan_in_fan_out: c.fan_in_fan_out,
    task_type: c.task_type,
  };
}

export interface JobJsonParts {
  readonly name: string;
  readonly created: Date;
  readonly baseModel: JobBaseModel;
  readonly adapter: JobAdapter;
  readonly adapterPath: string;
  readonly stepsTrained: number;
  readonly training: JobTrainingConfig;
  readonly data: DataSummary;
}

/** The whole of job.json. */
export function trainingJobJson(p: JobJsonParts): TrainingJobJson {
  if (typeof p.baseModel.id !== 'string' || p.baseModel.id === '') {
    throw new TrainingJobError('baseModel.id', 'is empty: the job script loads the base model from it');
  }
  if (typeof p.baseModel.modelType !== 'string' || p.baseModel.modelType === '') {
    throw new TrainingJobError('baseModel.modelType', 'is empty');
  }
  const training = trainingArguments(p.training);
  if (p.data.longest_example > training.max_length) {
    throw new TrainingJobError(
      'training.seq',
      `is ${training.max_length}, but an example has ${p.data.longest_example} tokens (TRL would truncate it)`,
    );
  }
  return {
    format: 'webtune-training-job',
    version: 1,
    name: p.name,
    created: p.created.toISOString(),
    base_model: {
      name_or_path: p.baseModel.id,
      model_type: p.baseModel.modelType,
      architecture: p.baseModel.architecture ?? null,
      revision: p.baseModel.revision ?? p.adapter.revision ?? null,
    },
    adapter: { path: p.adapterPath, steps_trained: p.stepsTrained, modules: p.adapter.modules.map((m) => m.name) },
    lora: loraArguments(p.adapter.config),
    training,
    data: p.data,
  };
}
