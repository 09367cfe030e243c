import source from '../../../../shaders/loss_scale.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError, WebtuneError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { REDUCE_OUT_SIZE } from './reduce.js';

/** A loss-scaling configuration that cannot work (a factor that is not a power of two, ...). */
export class LossScaleConfigError extends WebtuneError {}

/**
 * Dynamic loss scaling for a backward whose products stage gradients in f16 (torch.amp.GradScaler's
 * parameters, same defaults, plus a floor and a ceiling): the loss's gradient is multiplied by the
 * scale S, AdamW divides by it, an overflowed step is skipped and lowers S, and `growthInterval`
 * finite steps in a row raise it (shaders/loss_scale.wgsl). Every value is a power of two, so
 * scaling and unscaling change no bit of a gradient that neither overflows nor underflows.
 */
export interface LossScaleConfig {
  /** S at step 1. Default 2^16 (GradScaler's init_scale). */
  readonly initScale?: number;
  /** Default 2 (growth_factor). */
  readonly growthFactor?: number;
  /** Default 0.5 (backoff_factor). */
  readonly backoffFactor?: number;
  /** Finite steps in a row before S grows. Default 2000 (growth_interval). */
  readonly growthInterval?: number;
  /** The floor: at this S a gradient that is not finite is a divergence, not an overflow. Default 1. */
  readonly minScale?: number;
  /** The ceiling. Default 2^24. */
  readonly maxScale?: number;
}

export type ResolvedLossScale = Required<LossScaleConfig>;

/** f32 values of the scale's state buffer (loss_scale.wgsl): [S next, finite steps in a row, S this
 * step used, overflowed steps]. */
export const LOSS_SCALE_STATE_SIZE = 4;

function isPowerOfTwo(x: number): boolean {
  if (!(Number.isFinite(x) && x > 0)) return false;
  const e = Math.log2(x);
  return Number.isInteger(e) && e >= -126 && e <= 127;
}

/** Checks `c` and fills in the defaults. */
export function resolveLossScale(c: LossScaleConfig = {}): ResolvedLossScale {
  const r: ResolvedLossScale = {
    initScale: c.initScale ?? 2 ** 16,
    growthFactor: c.growthFactor ?? 2,
    backoffFactor: c.backoffFactor ?? 0.5,
    growthInterval: c.growthInterval ?? 2000,
    minScale: c.minScale ?? 1,
    maxScale: c.maxScale ?? 2 ** 24,
  };
  const bad = (what: string) => new LossScaleConfigError(`loss scale: ${what}`);
  for (const key of ['initScale', 'growthFactor', 'backoffFactor', 'minScale', 'maxScale'] as const) {
    if (!isPowerOfTwo(r[key])) throw bad(`${key} ${r[key]} must be a power of two (so scaling is exact)`);
  }
  if (!(r.growthFactor > 1)) throw bad(`growthFactor ${r.growthFactor} must be > 1`);
  if (!(r.backoffFactor < 1)) throw bad(`backoffFactor ${r.backoffFactor} must be < 1`);
  if (!Number.isSafeInteger(r.growthInterval) || r.growthInterval < 1 || r.growthInterval > 2 ** 24)
    throw bad(`growthInterval ${r.growthInterval} must be an integer in [1, 2^24]`);
  if (!(r.minScale <= r.initScale && r.initScale <= r.maxScale))
    throw bad(`initScale ${r.initScale} must lie in [minScale ${r.minScale}, maxScale ${r.maxScale}]`);
  return r;
}

/** The state buffer's values before step 1: S = initScale, no step counted yet. */
export function lossScaleInitialState(c: LossScaleConfig = {}, scale?: number, goodSteps = 0): Float32Array {
  const r = resolveLossScale(c);
  const s = scale ?? r.initScale;
  if (!isPowerOfTwo(s) || s < r.minScale || s > r.maxScale)
    throw new LossScaleConfigError(`loss scale: ${s} is not a power of two in [${r.minScale}, ${r.maxScale}]`);
  if (!Number.isSafeInteger(goodSteps) || goodSteps < 0 || goodSteps >= r.growthInterval)
    throw new LossScaleConfigError(`loss scale: ${goodSteps} finite steps is outside [0, ${r.growthInterval})`);
  return Float32Array.from([s, goodSteps, s, 0]);
}

export interface LossScaleUpdateBuffers {
  /** [3] f32 from planL2Norm over the step's gradients (read: the finite flag). */
  readonly norm: Tensor;
  /** u32 [1]: AdamW's latch (AdamWGuard.latch), read after the step's AdamW. */
  readonly latch: Tensor;
  /** [LOSS_SCALE_STATE_SIZE] f32, read and written (see LOSS_SCALE_STATE_SIZE). */
  readonly state: Tensor;
}

const spec: KernelSpec = {
  source,
  file: 'shaders/loss_scale.wgsl',
  entryPoint: 'loss_scale_update',
  bindings: ['uniform', 'read', 'read', 'write'],
};

/** The scale's update after AdamW (adamw_step_scaled) in the same step: one invocation. */
export async function planLossScaleUpdate(
  ctx: GpuContext,
  b: LossScaleUpdateBuffers,
  c: LossScaleConfig = {},
  label = 'loss_scale',
): Promise<Dispatch> {
  const r = resolveLossScale(c);
  checkLossScaleState(label, b.state);
  if (b.norm.dtype !== 'f32' || b.norm.size !== REDUCE_OUT_SIZE)
    throw new ShapeError(`${label}: norm ${b.norm.label} must be ${REDUCE_OUT_SIZE} f32 (planL2Norm's out)`);
  if (b.latch.dtype !== 'u32' || b.latch.size !== 1)
    throw new ShapeError(`${label}: latch ${b.latch.label} must be one u32`);
  const kernel = await getKernel(ctx, spec, {});
  const uniforms = new ArrayBuffer(32);
  new Float32Array(uniforms, 0, 4).set([r.growthFactor, r.backoffFactor, r.minScale, r.maxScale]);
  new Uint32Array(uniforms, 16, 1).set([r.growthInterval]);
  return bindKernel(ctx, kernel, { label, resources: [b.norm, b.latch, b.state], workgroups: [1], uniforms });
}

/** Refuses a state buffer that is not LOSS_SCALE_STATE_SIZE f32. */
export function checkLossScaleState(label: string, state: Tensor): void {
  if (state.dtype !== 'f32' || state.size !== LOSS_SCALE_STATE_SIZE)
    throw new ShapeError(
      `${label}: loss scale state ${state.label} ${state.dtype}${formatShape(state.shape)} must be ${LOSS_SCALE_STATE_SIZE} f32`,
    );
}
