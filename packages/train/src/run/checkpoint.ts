/**
 * Checkpoints: a LoraTrainer's state (A, B and AdamW's moments per module, the step) with what
 * the run around it needs to continue exactly (the data cursor, the losses so far, the resolved
 * configuration), as one record that storage replaces atomically.
 *
 * Tensor keys per adapted module m: `m.lora_A`, `m.lora_B`, `m.exp_avg.lora_A`,
 * `m.exp_avg.lora_B`, `m.exp_avg_sq.lora_A`, `m.exp_avg_sq.lora_B` (flat f32); an f16 run's loss
 * scale is in the meta (CheckpointMeta.lossScale). The schedule needs
 * no state of its own (the lr is a pure function of the step), and neither does any random
 * stream: the adapter's initialisation is only drawn at step 0 and the data order is a pure
 * function of (seed, epoch).
 */
import { WebtuneError } from '@webtune/core';
import type { DataCursor } from '../data/index.js';
import type { CheckpointMeta, CheckpointRecord } from '../store/types.js';
import type { TrainerModuleState, TrainerState } from '../trainer.js';
import type { RunConfig } from './config.js';

/** The part of a checkpoint that the run loop tracks. */
export interface RunProgress {
  readonly cursor: DataCursor;
  readonly losses: readonly (readonly [number, number])[];
  readonly validationLosses: readonly (readonly [number, number])[];
  readonly tokens: number;
  readonly seconds: number;
  readonly created: number;
}

export interface CheckpointIdentity {
  readonly baseModel: { readonly id: string | null; readonly fingerprint: string };
  readonly dataset: { readonly fingerprint: string; readonly examples: number; readonly validation: number };
}

export function makeCheckpoint(
  config: RunConfig,
  state: TrainerState,
  progress: RunProgress,
  identity: CheckpointIdentity,
): CheckpointRecord {
  const tensors: Record<string, Float32Array> = {};
  for (const m of state.modules) {
    tensors[`${m.name}.lora_A`] = m.a;
    tensors[`${m.name}.lora_B`] = m.b;
    tensors[`${m.name}.exp_avg.lora_A`] = m.expAvgA;
    tensors[`${m.name}.exp_avg.lora_B`] = m.expAvgB;
    tensors[`${m.name}.exp_avg_sq.lora_A`] = m.expAvgSqA;
    tensors[`${m.name}.exp_avg_sq.lora_B`] = m.expAvgSqB;
  }
  const meta: CheckpointMeta = {
    version: 1,
    name: config.name,
    step: state.step,
    totalSteps: config.totalSteps,
    cursor: progress.cursor,
    config: config as unknown as Record<string, unknown>,
    baseModel: identity.baseModel,
    dataset: identity.dataset,
    modules: state.modules.map((m) => m.name),
    losses: progress.losses,
    validationLosses: progress.validationLosses,
    tokens: progress.tokens,
    seconds: progress.seconds,
    created: progress.created,
    updated: Date.now(),
    ...(state.lossScale ? { lossScale: { scale: state.lossScale.scale, goodSteps: state.lossScale.goodSteps } } : {}),
  };
  return { meta, tensors };
}

/** A checkpoint that cannot be used: damaged, from another version, or missing tensors. */
export class CheckpointError extends WebtuneError {
  constructor(
    readonly run: string,
    readonly reason: string,
  ) {
    super(`checkpoint of run ${JSON.stringify(run)}: ${reason}`);
  }
}

/** The trainer state stored in a checkpoint (checked: every tensor present). */
export function checkpointState(record: CheckpointRecord): TrainerState {
  const { meta, tensors } = record;
  if (meta.version !== 1) throw new CheckpointError(meta.name, `version ${meta.version} is not supported`);
  const get = (key: string): Float32Array => {
    const t = tensors[key];
    if (!(t instanceof Float32Array)) throw new CheckpointError(meta.name, `tensor ${key} is missing`);
    return t;
  };
  const modules: TrainerModuleState[] = meta.modules.map((name) => ({
    name,
    a: get(`${name}.lora_A`),
    b: get(`${name}.lora_B`),
    expAvgA: get(`${name}.exp_avg.lora_A`),
    expAvgB: get(`${name}.exp_avg.lora_B`),
    expAvgSqA: get(`${name}.exp_avg_sq.lora_A`),
    expAvgSqB: get(`${name}.exp_avg_sq.lora_B`),
  }));
  return { step: meta.step, modules, ...(meta.lossScale ? { lossScale: meta.lossScale } : {}) };
}

export function checkpointConfig(meta: CheckpointMeta): RunConfig {
  return meta.config as unknown as RunConfig;
}
