import source from '../../../../shaders/layernorm.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { withGroupReduce } from './group_reduce.js';
import { checkNormRows, type NormSplit, rowReduceShape } from './rmsnorm.js';

const BINDINGS = {
  layernorm_fwd: ['uniform', 'read', 'read', 'read', 'write', 'write', 'write'],
  layernorm_fwd_copy: ['uniform', 'read', 'read', 'read', 'write', 'write', 'write', 'write'],
  layernorm_bwd: ['uniform', 'read', 'read', 'read', 'read', 'read', 'write'],
} as const;

// group_sum and friends (group_reduce.ts) go before the kernel's own source.
const sources = withGroupReduce('shaders/layernorm.wgsl', source);

const spec = (ctx: GpuContext, entryPoint: keyof typeof BINDINGS): KernelSpec => ({
  ...sources(ctx),
  entryPoint,
  bindings: BINDINGS[entryPoint],
});

export interface LayerNormOptions {
  /** config.layer_norm_epsilon; GPT-2 uses 1e-5. */
  readonly eps: number;
  readonly label?: string;
  /** Work split; default normSplit(ctx) (see rmsnorm.ts). Tests set it to run both on any adapter. */
  readonly split?: NormSplit;
}

export interface LayerNormForwardBuffers {
  /** [rows, d] f32. */
  readonly x: Tensor;
  /** [d] f32, frozen. d is read from its size. */
  readonly w: Tensor;
  /** [d] f32, frozen; omit for a LayerNorm without bias. */
  readonly b?: Tensor;
  /** [rows, d] f32, written. */
  readonly y: Tensor;
  /** [rows] f32 each, written: saved for the backward. The number of rows is read from rstd. */
  readonly mean: Tensor;
  readonly rstd: Tensor;
  /** [rows, d] f32, written when given: a copy of x (where a transformer layer's next projection
   * accumulates its output: the residual add). */
  readonly xCopy?: Tensor;
}

export interface LayerNormBackwardBuffers {
  readonly x: Tensor;
  readonly w: Tensor;
  /** [rows] each, from the forward. */
  readonly mean: Tensor;
  readonly rstd: Tensor;
  readonly dy: Tensor;
  /** [rows, d]; written, or accumulated with `accumulate`. */
  readonly dx: Tensor;
}

function resolve(op: string, w: Tensor, mean: Tensor, rstd: Tensor, eps: number): { rows: number; d: number } {
  if (w.dtype !== 'f32') throw new ShapeError(`${op}: w ${w.label} must be f32, got ${w.dtype}`);
  if (!Number.isFinite(eps) || eps < 0) throw new ShapeError(`${op}: eps ${eps} must be ≥ 0`);
  for (const [name, t] of [
    ['mean', mean],
    ['rstd', rstd],
  ] as const) {
    if (t.dtype !== 'f32' || t.size !== rstd.size) {
      throw new ShapeError(
        `${op}: ${name} ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 with one value per row (${rstd.size})`,
      );
    }
  }
  return { rows: rstd.size, d: w.size };
}

function uniforms(rows: number, d: number, eps: number, hasBias: boolean, accumulate: boolean, gridX: number) {
  return packUniforms([
    ['u32', rows],
    ['u32', d],
    ['f32', eps],
    ['u32', hasBias ? 1 : 0],
    ['u32', accumulate ? 1 : 0],
    ['u32', gridX],
  ]);
}

/** y = (x − mean)·rstd·w + b per row, saving mean and rstd. One dispatch. */
export async function planLayerNormForward(
  ctx: GpuContext,
  io: LayerNormForwardBuffers,
  opts: LayerNormOptions,
): Promise<Dispatch> {
  const label = opts.label ?? 'layernorm';
  const op = `${label}.forward`;
  const { rows, d } = resolve(op, io.w, io.mean, io.rstd, opts.eps);
  checkNormRows(op, 'x', io.x, rows, d, 1, undefined);
  checkNormRows(op, 'y', io.y, rows, d, 1, undefined);
  if (io.b && (io.b.size !== d || io.b.dtype !== 'f32')) {
    throw new ShapeError(`${op}: b ${io.b.label} ${io.b.dtype}${formatShape(io.b.shape)} must be ${d} f32 values`);
  }
  if (io.xCopy) checkNormRows(op, 'xCopy', io.xCopy, rows, d, 1, undefined);
  const shape = rowReduceShape(ctx, rows, d, opts.split);
  const entry = io.xCopy ? 'layernorm_fwd_copy' : 'layernorm_fwd';
  const kernel = await getKernel(ctx, spec(ctx, entry), { WG: shape.wg, TPR: shape.tpr });
  return bindKernel(ctx, kernel, {
    label,
    resources: [io.x, io.w, io.b ?? ctx.placeholder(), io.mean, io.rstd, io.y, ...(io.xCopy ? [io.xCopy] : [])],
    workgroups: shape.workgroups,
    uniforms: uniforms(rows, d, opts.eps, io.b !== undefined, false, shape.gridX),
  });
}

/**
 * dx from dy, x, w and the saved mean and rstd. w and b are frozen: no dw, no db. With
 * `accumulate`, dx += the gradient. One dispatch.
 */
export async function planLayerNormBackward(
  ctx: GpuContext,
  io: LayerNormBackwardBuffers,
  opts: LayerNormOptions & { readonly accumulate?: boolean },
): Promise<Dispatch> {
  const label = opts.label ?? 'layernorm';
  const op = `${label}.backward`;
  const { rows, d } = resolve(op, io.w, io.mean, io.rstd, opts.eps);
  checkNormRows(op, 'x', io.x, rows, d, 1, undefined);
  checkNormRows(op, 'dy', io.dy, rows, d, 1, undefined);
  checkNormRows(op, 'dx', io.dx, rows, d, 1, undefined);
  const shape = rowReduceShape(ctx, rows, d, opts.split);
  const kernel = await getKernel(ctx, spec(ctx, 'layernorm_bwd'), { WG: shape.wg, TPR: shape.tpr });
  return bindKernel(ctx, kernel, {
    label: `${label}.dx`,
    resources: [io.x, io.w, io.mean, io.rstd, io.dy, io.dx],
    workgroups: shape.workgroups,
    uniforms: uniforms(rows, d, opts.eps, false, opts.accumulate ?? false, shape.gridX),
  });
}
