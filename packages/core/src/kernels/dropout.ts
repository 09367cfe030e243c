import source from '../../../../shaders/dropout.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { grid1d } from './elementwise.js';

const SPEC: KernelSpec = {
  source,
  file: 'shaders/dropout.wgsl',
  entryPoint: 'dropout_fwd',
  bindings: ['uniform', 'read', 'read', 'write'],
};

/** What a dropout mask depends on besides the element: see shaders/dropout.wgsl. */
export interface DropoutMask {
  /** Probability of dropping an element, in [0, 1). */
  readonly p: number;
  /** Which module's mask (LoRA layers get their own, as PEFT's nn.Dropout per layer). */
  readonly module: number;
  /** u32 [4] on the GPU: seed, step, micro-batch, 0 (rewritten per step and micro-batch). */
  readonly counter: Tensor;
}

/** The u32 below which a hash drops its element: round(p · 2^32). */
export function dropoutThreshold(p: number): number {
  return Math.min(2 ** 32 - 1, Math.round(p * 2 ** 32));
}

/** The four u32 of a dropout counter buffer for one micro-batch of one optimizer step. */
export function dropoutCounter(seed: number, step: number, micro: number): Uint32Array {
  return Uint32Array.from([seed >>> 0, step >>> 0, micro >>> 0, 0]);
}

/**
 * y = beta·y + alpha·keep·x/(1 − p) over x's elements (x and y the same size and distinct):
 * the masked input of a LoRA branch (alpha 1, beta 0), or its masked term added to dx (beta 1).
 */
export async function planDropout(
  ctx: GpuContext,
  mask: DropoutMask,
  x: Tensor,
  y: Tensor,
  opts: { alpha?: number; beta?: number; label?: string } = {},
): Promise<Dispatch> {
  const label = opts.label ?? 'dropout';
  if (!(mask.p >= 0 && mask.p < 1)) throw new ShapeError(`${label}: dropout probability ${mask.p} is not in [0, 1)`);
  if (!Number.isSafeInteger(mask.module) || mask.module < 0 || mask.module >= 2 ** 32)
    throw new ShapeError(`${label}: module id ${mask.module} is not a u32`);
  if (mask.counter.dtype !== 'u32' || mask.counter.size < 4)
    throw new ShapeError(`${label}: counter ${mask.counter.label} must hold 4 u32 (seed, step, micro-batch, 0)`);
  if (x.dtype !== 'f32' || y.dtype !== 'f32' || x.size !== y.size || x.size >= 2 ** 32) {
    throw new ShapeError(
      `${label}: x ${x.label} ${x.dtype}${formatShape(x.shape)} and y ${y.label} ${y.dtype}${formatShape(y.shape)} must be f32 of one size`,
    );
  }
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const kernel = await getKernel(ctx, SPEC, { WG: wg });
  const g = grid1d(ctx, x.size, wg);
  return bindKernel(ctx, kernel, {
    label,
    resources: [mask.counter, x, y],
    workgroups: g.workgroups,
    uniforms: packUniforms([
      ['u32', x.size],
      ['u32', mask.module],
      ['u32', dropoutThreshold(mask.p)],
      ['u32', g.rowStride],
      ['f32', opts.alpha ?? 1],
      ['f32', opts.beta ?? 0],
      ['f32', 1 / (1 - mask.p)],
    ]),
  });
}
