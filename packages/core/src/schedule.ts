/**
 * Learning-rate schedules, computed exactly as Hugging Face transformers' get_constant_schedule,
 * get_constant_schedule_with_warmup, get_linear_schedule_with_warmup and
 * get_cosine_schedule_with_warmup do through torch's LambdaLR: the lr of optimizer step k
 * (k = 0 for the first step, so AdamW's t = k + 1) is `lr · lambda(k)`. Same float64 operations
 * in the same order, so the values equal Python's to the last bit (the cosine to within the
 * libraries' cos, which may differ by an ulp).
 */
import { ShapeError } from './errors.js';

export type LrScheduleKind = 'constant' | 'constant_with_warmup' | 'linear' | 'cosine';

export interface LrSchedule {
  readonly kind: LrScheduleKind;
  /** The peak (base) learning rate: the optimizer's lr in transformers. */
  readonly lr: number;
  /** Steps of linear warmup from 0 (num_warmup_steps). Ignored by 'constant'. Default 0. */
  readonly warmupSteps?: number;
  /** num_training_steps: where 'linear' reaches 0 and 'cosine' its minimum. Required by both. */
  readonly totalSteps?: number;
  /** Cosine waves over the decay (num_cycles); 0.5 = one half-cosine down to 0. Default 0.5. */
  readonly numCycles?: number;
}

function checkSchedule(s: LrSchedule): void {
  const bad = (what: string) => new ShapeError(`learning-rate schedule '${s.kind}': ${what}`);
  if (!['constant', 'constant_with_warmup', 'linear', 'cosine'].includes(s.kind)) {
    throw new ShapeError(`unknown learning-rate schedule '${s.kind}' (constant, constant_with_warmup, linear, cosine)`);
  }
  if (!Number.isFinite(s.lr) || s.lr < 0) throw bad(`lr ${s.lr} must be a finite number ≥ 0`);
  const w = s.warmupSteps ?? 0;
  if (!Number.isSafeInteger(w) || w < 0) throw bad(`warmupSteps ${w} must be an integer ≥ 0`);
  if (s.kind === 'linear' || s.kind === 'cosine') {
    const t = s.totalSteps;
    if (t === undefined || !Number.isSafeInteger(t) || t < 0) throw bad(`totalSteps ${t} must be an integer ≥ 0`);
  }
  if (s.numCycles !== undefined && !Number.isFinite(s.numCycles)) throw bad(`numCycles ${s.numCycles}`);
}

/** The multiplier lambda(k) of the base lr for optimizer step k (0-based). */
export function lrLambda(s: LrSchedule, k: number): number {
  checkSchedule(s);
  if (!Number.isSafeInteger(k) || k < 0) throw new ShapeError(`learning-rate step ${k} must be an integer ≥ 0`);
  const warmup = s.warmupSteps ?? 0;
  // 1. 'constant' has no warmup at all (get_constant_schedule ignores num_warmup_steps).
  if (s.kind === 'constant') return 1;
  // 2. Warmup: k / max(1, W), rising linearly from 0 at k = 0 (the first step's lr is 0).
  if (k < warmup) return k / Math.max(1, warmup);
  // 3. After warmup 'constant_with_warmup' stays at the base lr.
  if (s.kind === 'constant_with_warmup') return 1;
  const total = s.totalSteps as number;
  if (s.kind === 'linear') {
    // 4. Linear decay to 0 at k = totalSteps, then clamped at 0.
    return Math.max(0, (total - k) / Math.max(1, total - warmup));
  }
  // 5. Cosine: progress runs 0 → 1 over the decay; 0.5·(1 + cos(π·cycles·2·progress)), clamped
  //    at 0. Past totalSteps progress exceeds 1 and the half-cosine rises again, as in
  //    transformers (the trainer stops at totalSteps).
  const progress = (k - warmup) / Math.max(1, total - warmup);
  const factor = 0.5 * (1.0 + Math.cos(Math.PI * (s.numCycles ?? 0.5) * 2.0 * progress));
  return Math.max(0, factor);
}

/** The learning rate of optimizer step k (0-based): what AdamW uses as lr at its step t = k + 1. */
export function learningRate(s: LrSchedule, k: number): number {
  return s.lr * lrLambda(s, k);
}
