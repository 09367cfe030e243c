import source from '../../../../shaders/adamw.wgsl?raw';
import type { GpuContext } from '../context.js';
import { LimitExceededError, ShapeError, WebtuneError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { grid1d } from './elementwise.js';
import { checkLossScaleState, type LossScaleConfig, resolveLossScale } from './loss_scale.js';
import { REDUCE_OUT_SIZE } from './reduce.js';

/** Hyperparameters that cannot work (negative lr, β outside [0, 1), eps ≤ 0, ...). */
export class AdamWConfigError extends WebtuneError {}

/**
 * torch.optim.AdamW's hyperparameters (same defaults), plus clip_grad_norm_'s max_norm. The
 * learning rate usually changes every step (schedule.ts); everything here may.
 */
export interface AdamWHyperparameters {
  readonly lr: number;
  /** Default 0.9. */
  readonly beta1?: number;
  /** Default 0.999. */
  readonly beta2?: number;
  /** Added to sqrt(v̂); must be > 0 (the arena's zero padding would otherwise divide 0 by 0). Default 1e-8. */
  readonly eps?: number;
  /** Decoupled weight decay λ: p ← p − lr·λ·p. Default 0.01 (torch's AdamW default). */
  readonly weightDecay?: number;
  /** Clip the global gradient norm to this (clip_grad_norm_); undefined or Infinity: no clipping. */
  readonly maxNorm?: number;
}

/**
 * Bytes of the per-step part of adamw.wgsl's uniform: the 8 fields the host rewrites every step
 * (`dispatch.setUniforms(adamwStepUniforms(h, t))`). The layout, f32 each, in order:
 *
 *   0 decay            1 − lr·weightDecay
 *   1 beta2            β2
 *   2 one_minus_beta1  1 − β1
 *   3 one_minus_beta2  1 − β2
 *   4 step_size        lr / (1 − β1^t)
 *   5 bc2_sqrt         sqrt(1 − β2^t)
 *   6 eps
 *   7 max_norm         0 when not clipping
 *
 * each computed in float64 and rounded to f32 once, as torch does with its Python scalars. The
 * rest of the uniform (n, the grid's row stride and the guard's loss count, u32, and the loss
 * scale's floor, f32: bytes 32..47) is written by planAdamW and never changes.
 */
export const ADAMW_STEP_UNIFORM_BYTES = 32;

/** Checks `h` and fills in torch's defaults. */
export function resolveAdamW(h: AdamWHyperparameters): Required<Omit<AdamWHyperparameters, 'maxNorm'>> & {
  maxNorm: number | undefined;
} {
  const r = {
    lr: h.lr,
    beta1: h.beta1 ?? 0.9,
    beta2: h.beta2 ?? 0.999,
    eps: h.eps ?? 1e-8,
    weightDecay: h.weightDecay ?? 0.01,
    maxNorm: h.maxNorm === Number.POSITIVE_INFINITY ? undefined : h.maxNorm,
  };
  const bad = (what: string) => new AdamWConfigError(`AdamW: ${what}`);
  if (!Number.isFinite(r.lr) || r.lr < 0) throw bad(`lr ${r.lr} must be a finite number ≥ 0`);
  for (const [name, b] of [
    ['beta1', r.beta1],
    ['beta2', r.beta2],
  ] as const) {
    if (!(b >= 0 && b < 1)) throw bad(`${name} ${b} must be in [0, 1)`);
  }
  if (!(Number.isFinite(r.eps) && r.eps > 0)) throw bad(`eps ${r.eps} must be a finite number > 0`);
  if (!Number.isFinite(r.weightDecay) || r.weightDecay < 0) throw bad(`weightDecay ${r.weightDecay} must be ≥ 0`);
  if (r.maxNorm !== undefined && !(Number.isFinite(r.maxNorm) && r.maxNorm > 0)) {
    throw bad(`maxNorm ${r.maxNorm} must be > 0 (or undefined for no clipping)`);
  }
  return r;
}

/** The per-step uniform fields (see ADAMW_STEP_UNIFORM_BYTES) for step t = 1, 2, ... */
export function adamwStepUniforms(h: AdamWHyperparameters, t: number): ArrayBuffer {
  const r = resolveAdamW(h);
  if (!Number.isSafeInteger(t) || t < 1) throw new AdamWConfigError(`AdamW: step ${t} must be an integer ≥ 1`);
  const bytes = new ArrayBuffer(ADAMW_STEP_UNIFORM_BYTES);
  new Float32Array(bytes).set([
    1 - r.lr * r.weightDecay,
    r.beta2,
    1 - r.beta1,
    1 - r.beta2,
    r.lr / (1 - r.beta1 ** t),
    Math.sqrt(1 - r.beta2 ** t),
    r.eps,
    r.maxNorm ?? 0,
  ]);
  return bytes;
}

export interface AdamWBuffers {
  /** [3] f32 from planL2Norm over `grad`, read: [global norm, finite flag, non-finite count]. */
  readonly norm: Tensor;
  /** [n] f32 gradients (the gradient arena), read only: clipping happens in registers. */
  readonly grad: Tensor;
  /** [n] f32 parameters (the parameter arena), updated in place. */
  readonly param: Tensor;
  /** [n] f32 first moment (exp_avg), zero before step 1, updated in place. */
  readonly m: Tensor;
  /** [n] f32 second moment (exp_avg_sq), zero before step 1, updated in place. */
  readonly v: Tensor;
}

const spec: KernelSpec = {
  source,
  file: 'shaders/adamw.wgsl',
  entryPoint: 'adamw_step',
  bindings: ['uniform', 'read', 'read', 'write', 'write', 'write'],
};

const guardedSpec: KernelSpec = {
  source,
  file: 'shaders/adamw.wgsl',
  entryPoint: 'adamw_step_guarded',
  bindings: ['uniform', 'read', 'read', 'write', 'write', 'write', 'read', 'write'],
};

/**
 * The latch of a pipelined trainer (adamw_step_guarded): the update is also skipped when one of
 * `count` losses is not finite, and the first skipped step sets `latch` (u32 [1]) so that every
 * later step skips until the host writes 0 there again.
 */
export interface AdamWGuard {
  /** f32, [loss, count] per micro-batch: the loss at even indices 0, 2, ..., 2·(count − 1). */
  readonly losses: Tensor;
  readonly count: number;
  /** u32 [1]: 0 = train, anything else = skip (set by the kernel, cleared by the host). */
  readonly latch: Tensor;
}

const scaledSpec: KernelSpec = {
  source,
  file: 'shaders/adamw.wgsl',
  entryPoint: 'adamw_step_scaled',
  bindings: ['uniform', 'read', 'read', 'write', 'write', 'write', 'read', 'write', 'read'],
};

/**
 * Gradients that carry a dynamic loss scale (adamw_step_scaled): the update divides them and their
 * norm by the scale, and a gradient that is not finite skips the step without latching (an
 * overflow, which the scale's update answers) unless the scale is at its floor. With a guard only.
 */
export interface AdamWLossScale {
  /** planLossScaleUpdate's state (S in element 0), read. */
  readonly state: Tensor;
  /** The configuration the state is updated with (its floor matters here). */
  readonly config?: LossScaleConfig;
}

/**
 * One AdamW step over whole arenas (every LoRA matrix at once), with gradient clipping fused in.
 * Record it after planL2Norm's dispatches over the same `grad` in the same step; it reads the norm
 * and the finite flag on the GPU and skips the whole update (param, m, v untouched) when the
 * gradients hold a NaN or ±Inf. The uniform starts as step `step` (default 1) of `h`; before
 * each later step call `dispatch.setUniforms(adamwStepUniforms(h, t))` with the new t (and lr).
 * With `guard`, the update also skips on a non-finite loss and latches (see AdamWGuard); with
 * `lossScale` as well, the gradients are unscaled first (see AdamWLossScale).
 */
export async function planAdamW(
  ctx: GpuContext,
  b: AdamWBuffers,
  h: AdamWHyperparameters,
  options: { step?: number; label?: string; guard?: AdamWGuard; lossScale?: AdamWLossScale } = {},
): Promise<Dispatch> {
  const label = options.label ?? 'adamw';
  const n = b.param.size;
  for (const [name, t] of Object.entries(b) as [keyof AdamWBuffers, Tensor][]) {
    if (t.dtype !== 'f32') throw new ShapeError(`${label}: ${name} ${t.label} is ${t.dtype}, must be f32`);
    if (name !== 'norm' && t.size !== n) {
      throw new ShapeError(
        `${label}: ${name} ${t.label} ${formatShape(t.shape)} has ${t.size} elements, param ${b.param.label} ${formatShape(b.param.shape)} has ${n}`,
      );
    }
  }
  if (b.norm.size !== REDUCE_OUT_SIZE) {
    throw new ShapeError(
      `${label}: norm ${b.norm.label} ${formatShape(b.norm.shape)} must have ${REDUCE_OUT_SIZE} elements (planL2Norm's out)`,
    );
  }
  const roles = Object.entries(b) as [keyof AdamWBuffers, Tensor][];
  for (const [name, w] of roles) {
    if (name !== 'param' && name !== 'm' && name !== 'v') continue;
    for (const [otherName, other] of roles) {
      if (otherName !== name && other.buffer === w.buffer) {
        throw new ShapeError(
          `${label}: ${name} ${w.label} and ${otherName} ${other.label} share a buffer; param, m and v are written and must be separate arenas`,
        );
      }
    }
  }
  const guard = options.guard;
  if (guard) {
    if (!Number.isSafeInteger(guard.count) || guard.count < 1 || guard.losses.dtype !== 'f32') {
      throw new ShapeError(`${label}: the guard needs f32 losses and a count ≥ 1, got ${guard.count}`);
    }
    if (guard.losses.size < 2 * guard.count) {
      throw new ShapeError(
        `${label}: losses ${guard.losses.label} ${formatShape(guard.losses.shape)} holds fewer than ${guard.count} [loss, count] pairs`,
      );
    }
    if (guard.latch.dtype !== 'u32' || guard.latch.size !== 1) {
      throw new ShapeError(`${label}: latch ${guard.latch.label} must be one u32`);
    }
  }
  const scaled = options.lossScale;
  if (scaled && !guard) throw new ShapeError(`${label}: a loss scale needs the guard (adamw_step_scaled)`);
  if (scaled) {
    checkLossScaleState(label, scaled.state);
    const have = ctx.limits.maxStorageBuffersPerShaderStage;
    if (have < 8) throw new LimitExceededError('maxStorageBuffersPerShaderStage', 8, have, label);
  }
  const minScale = scaled ? resolveLossScale(scaled.config).minScale : 0;
  const step = adamwStepUniforms(h, options.step ?? 1);
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup, ctx.limits.maxComputeWorkgroupSizeX);
  const kernel = await getKernel(ctx, scaled ? scaledSpec : guard ? guardedSpec : spec, { WG: wg });
  const g = grid1d(ctx, n, wg);
  const uniforms = new ArrayBuffer(ADAMW_STEP_UNIFORM_BYTES + 16);
  new Uint8Array(uniforms).set(new Uint8Array(step));
  new Uint32Array(uniforms, ADAMW_STEP_UNIFORM_BYTES, 3).set([n, g.rowStride, guard?.count ?? 0]);
  new Float32Array(uniforms, ADAMW_STEP_UNIFORM_BYTES + 12, 1).set([minScale]);
  return bindKernel(ctx, kernel, {
    label,
    resources: [
      b.norm,
      b.grad,
      b.param,
      b.m,
      b.v,
      ...(guard ? [guard.losses, guard.latch] : []),
      ...(scaled ? [scaled.state] : []),
    ],
    workgroups: g.workgroups,
    uniforms,
  });
}
