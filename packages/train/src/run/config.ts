/**
 * A training run's configuration as the user gives it (TrainConfig, every field optional) and as
 * the run and its checkpoints keep it (RunConfig: every default filled in, steps counted, plain
 * JSON), so a resumed run continues with exactly the settings it started with.
 */
import { WebtuneError } from '@webtune/core';
import type { TrainConfig } from '../api/types.js';
import type { DataStats } from '../data/index.js';
import { estimateTraining } from '../data/index.js';
import { type LoraConfig, validateLoraConfig } from '../lora/index.js';
import type { OptimizerOptions, TrainerOptions } from '../trainer.js';

/** A setting of a training run that cannot be used, named. */
export class TrainConfigError extends WebtuneError {
  constructor(
    readonly field: string,
    readonly reason: string,
  ) {
    super(`training setting ${field}: ${reason}`);
  }
}

export interface RunConfig {
  readonly name: string;
  /** The PEFT LoraConfig, validated (targets as given; resolved on the model when the run starts). */
  readonly lora: LoraConfig;
  readonly optimizer: {
    readonly lr: number;
    readonly beta1: number;
    readonly beta2: number;
    readonly eps: number;
    readonly weightDecay: number;
    /** null: no clipping. */
    readonly maxGradNorm: number | null;
  };
  readonly schedule: { readonly kind: 'constant' | 'linear' | 'cosine'; readonly warmupSteps: number };
  readonly totalSteps: number;
  /** Micro-batches over the whole run (with epochs, the last step may take fewer than gradAccum). */
  readonly batches: number;
  readonly epochs: number;
  readonly batch: number;
  readonly seq: number;
  readonly gradAccum: number;
  readonly seed: number;
  readonly checkpointEvery: number;
  readonly evalEvery: number;
  readonly recompute: boolean;
  /** The tile math when asked for (TrainConfig.tileMath); absent: the device's default. */
  readonly tileMath?: 'f16' | 'f32';
  /** The library adapter the run started from, if any. */
  readonly from: string | null;
}

export const RUN_DEFAULTS = Object.freeze({
  rank: 8,
  lr: 2e-4,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
  maxGradNorm: 1,
  batch: 4,
  checkpointEvery: 25,
});

function tileMathSetting(value: unknown): 'f16' | 'f32' {
  if (value !== 'f16' && value !== 'f32')
    throw new TrainConfigError('tileMath', `must be 'f16' or 'f32', got ${JSON.stringify(value)}`);
  return value;
}

function integer(field: string, value: unknown, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min)
    throw new TrainConfigError(field, `must be an integer ≥ ${min}, got ${JSON.stringify(value)}`);
  return value;
}

function positive(field: string, value: unknown, { zero = false } = {}): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || (!zero && value === 0))
    throw new TrainConfigError(field, `must be a finite number ${zero ? '≥' : '>'} 0, got ${JSON.stringify(value)}`);
  return value;
}

/** A default run name: "adapter-2026-12-04-0312". */
export function defaultRunName(now = new Date()): string {
  const pad = (n: number) => String(n).padStart(2, '0');
  return `adapter-${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}${pad(now.getSeconds())}`;
}

export interface RunConfigContext {
  /** The training split's statistics (steps per epoch come from it). */
  readonly stats: Pick<DataStats, 'examples' | 'tokens' | 'trainedTokens'>;
  /** The sequence length the data was tokenized for, and its longest example. */
  readonly datasetSeq: number;
  readonly longestExample: number;
  readonly maxPositions: number;
  /** A saved adapter's configuration, for `from`. */
  readonly fromConfig?: LoraConfig;
}

/** Fills every default of a TrainConfig and counts the run's steps (see RunConfig). */
export function resolveRunConfig(config: TrainConfig, context: RunConfigContext): RunConfig {
  const name = config.name ?? defaultRunName();
  const l = config.lora ?? {};
  let lora: LoraConfig;
  if (config.from !== undefined) {
    if (!context.fromConfig) throw new TrainConfigError('from', `no configuration for adapter ${config.from}`);
    if (config.lora !== undefined)
      throw new TrainConfigError(
        'lora',
        'continuing an adapter keeps its LoRA configuration (rank, targets ...); leave `lora` out',
      );
    lora = context.fromConfig;
  } else {
    const rank = integer('lora.rank', l.rank ?? RUN_DEFAULTS.rank, 1);
    try {
      lora = validateLoraConfig({
        ...l.peft,
        r: rank,
        lora_alpha: l.alpha ?? 2 * rank,
        target_modules: l.targets ?? null,
        use_rslora: l.rsLoRA ?? false,
        lora_dropout: l.dropout ?? 0,
      });
    } catch (error) {
      if (error instanceof WebtuneError) throw error;
      throw new TrainConfigError('lora', error instanceof Error ? error.message : String(error));
    }
  }
  const o = config.optimizer ?? {};
  const maxGradNorm = o.maxGradNorm === undefined ? RUN_DEFAULTS.maxGradNorm : o.maxGradNorm;
  const optimizer = {
    lr: positive('optimizer.lr', o.lr ?? RUN_DEFAULTS.lr),
    beta1: positive('optimizer.beta1', o.beta1 ?? RUN_DEFAULTS.beta1, { zero: true }),
    beta2: positive('optimizer.beta2', o.beta2 ?? RUN_DEFAULTS.beta2, { zero: true }),
    eps: positive('optimizer.eps', o.eps ?? RUN_DEFAULTS.eps),
    weightDecay: positive('optimizer.weightDecay', o.weightDecay ?? RUN_DEFAULTS.weightDecay, { zero: true }),
    maxGradNorm: maxGradNorm === null ? null : positive('optimizer.maxGradNorm', maxGradNorm),
  };
  if (optimizer.beta1 >= 1 || optimizer.beta2 >= 1)
    throw new TrainConfigError('optimizer.beta1/beta2', 'must be below 1');
  const kind = config.schedule?.kind ?? 'linear';
  if (kind !== 'constant' && kind !== 'linear' && kind !== 'cosine')
    throw new TrainConfigError('schedule.kind', `must be constant, linear or cosine, got ${JSON.stringify(kind)}`);
  const warmupSteps = integer('schedule.warmupSteps', config.schedule?.warmupSteps ?? 0, 0);

  const batch = integer('batch', config.batch ?? RUN_DEFAULTS.batch, 1);
  const gradAccum = integer('gradAccum', config.gradAccum ?? 1, 1);
  const seq = integer('seq', config.seq ?? context.datasetSeq, 2);
  if (seq > context.maxPositions)
    throw new TrainConfigError('seq', `${seq} is longer than the model's context (${context.maxPositions} tokens)`);
  if (seq < context.longestExample)
    throw new TrainConfigError(
      'seq',
      `${seq} is shorter than the longest example (${context.longestExample} tokens); load the data again with seq ${seq} to truncate it`,
    );
  if (config.steps !== undefined && config.epochs !== undefined)
    throw new TrainConfigError('steps', 'give steps or epochs, not both');
  if (config.steps !== undefined) integer('steps', config.steps, 1);
  if (config.epochs !== undefined) positive('epochs', config.epochs);
  const plan = estimateTraining({ ...context.stats, examples: context.stats.examples } as DataStats, {
    batch,
    seq,
    gradAccum,
    ...(config.steps !== undefined ? { steps: config.steps } : { epochs: config.epochs ?? 1 }),
  });
  const checkpointEvery = integer('checkpointEvery', config.checkpointEvery ?? RUN_DEFAULTS.checkpointEvery, 0);
  const evalEvery = integer('evalEvery', config.evalEvery ?? (checkpointEvery || plan.steps), 1);
  return {
    name,
    lora,
    optimizer,
    schedule: { kind, warmupSteps },
    totalSteps: plan.steps,
    batches: plan.batches,
    epochs: plan.epochs,
    batch,
    seq,
    gradAccum,
    seed: integer('seed', config.seed ?? 0, 0),
    checkpointEvery,
    evalEvery,
    recompute: config.recompute ?? false,
    ...(config.tileMath === undefined ? {} : { tileMath: tileMathSetting(config.tileMath) }),
    from: config.from ?? null,
  };
}

export function optimizerOptions(run: RunConfig): OptimizerOptions {
  const o = run.optimizer;
  return {
    lr: o.lr,
    beta1: o.beta1,
    beta2: o.beta2,
    eps: o.eps,
    weightDecay: o.weightDecay,
    maxGradNorm: o.maxGradNorm === null ? Infinity : o.maxGradNorm,
  };
}

/** LoraTrainer's options for a run (the LoRA targets as given or already resolved). */
export function trainerOptions(
  run: RunConfig,
  lora: TrainerOptions['lora'],
  extra: Pick<TrainerOptions, 'initialWeights' | 'memoryBudget'> = {},
): TrainerOptions {
  return {
    lora,
    batch: run.batch,
    seq: run.seq,
    gradAccum: run.gradAccum,
    optimizer: optimizerOptions(run),
    schedule: { kind: run.schedule.kind, warmupSteps: run.schedule.warmupSteps, totalSteps: run.totalSteps },
    seed: run.seed,
    recompute: run.recompute,
    ...(run.tileMath ? { tileMath: run.tileMath } : {}),
    ...extra,
  };
}
