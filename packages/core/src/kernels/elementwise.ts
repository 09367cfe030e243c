import source from '../../../../shaders/elementwise.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type Kernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';

/** Spreads `n` invocations over a 2-D grid of `wg`-wide workgroups within the per-dimension limit. */
export function grid1d(ctx: GpuContext, n: number, wg: number): { workgroups: [number, number]; rowStride: number } {
  const groups = Math.max(1, Math.ceil(n / wg));
  const max = ctx.limits.maxComputeWorkgroupsPerDimension;
  const x = Math.min(groups, max);
  return { workgroups: [x, Math.ceil(groups / x)], rowStride: x * wg };
}

/** An entry of elementwise.wgsl with its workgroup size (256, or the device's limit). */
async function elementwiseKernel(
  ctx: GpuContext,
  entryPoint: string,
  bindings: KernelSpec['bindings'],
): Promise<{ kernel: Kernel; wg: number }> {
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const kernel = await getKernel(ctx, { source, file: 'shaders/elementwise.wgsl', entryPoint, bindings }, { WG: wg });
  return { kernel, wg };
}

/** out = a + alpha·b, element by element. */
export async function planAddScaled(
  ctx: GpuContext,
  a: Tensor,
  b: Tensor,
  out: Tensor,
  alpha = 1,
  label = 'add_scaled',
): Promise<Dispatch> {
  if (a.size !== b.size || a.size !== out.size) {
    throw new ShapeError(
      `${label}: sizes differ: a ${formatShape(a.shape)}, b ${formatShape(b.shape)}, out ${formatShape(out.shape)}`,
    );
  }
  const { kernel, wg } = await elementwiseKernel(ctx, 'add_scaled', ['uniform', 'read', 'read', 'write']);
  const g = grid1d(ctx, a.size, wg);
  return bindKernel(ctx, kernel, {
    label,
    resources: [a, b, out],
    workgroups: g.workgroups,
    uniforms: packUniforms([
      ['u32', a.size],
      ['f32', alpha],
      ['u32', g.rowStride],
    ]),
  });
}

export interface RowCopy {
  rows: number;
  cols: number;
  srcStride?: number;
  srcOffset?: number;
  dstStride?: number;
  dstOffset?: number;
}

/**
 * Copies `rows` rows of `cols` values from src into dst starting at row positions[0] (an i32 the
 * host rewrites between steps): the new token's keys and values into a KV cache. Bounds are
 * checked here for the largest position the caller allows (`maxBase`).
 */
export async function planCopyRows(
  ctx: GpuContext,
  src: Tensor,
  positions: Tensor,
  dst: Tensor,
  copy: RowCopy,
  maxBase: number,
  label = 'copy_rows',
): Promise<Dispatch> {
  const srcStride = copy.srcStride ?? copy.cols;
  const dstStride = copy.dstStride ?? copy.cols;
  const srcOffset = copy.srcOffset ?? 0;
  const dstOffset = copy.dstOffset ?? 0;
  if (positions.dtype !== 'i32' || positions.size < 1) throw new ShapeError(`${label}: positions must hold an i32`);
  if ((copy.rows - 1) * srcStride + srcOffset + copy.cols > src.size) {
    throw new ShapeError(
      `${label}: src ${src.label} ${formatShape(src.shape)} is too small for ${copy.rows} rows of ${copy.cols}`,
    );
  }
  if ((maxBase + copy.rows - 1) * dstStride + dstOffset + copy.cols > dst.size) {
    throw new ShapeError(
      `${label}: dst ${dst.label} ${formatShape(dst.shape)} cannot take rows up to ${maxBase + copy.rows - 1}`,
    );
  }
  const { kernel, wg } = await elementwiseKernel(ctx, 'copy_rows', ['uniform', 'read', 'read', 'write']);
  const g = grid1d(ctx, copy.rows * copy.cols, wg);
  return bindKernel(ctx, kernel, {
    label,
    resources: [src, positions, dst],
    workgroups: g.workgroups,
    uniforms: packUniforms([
      ['u32', copy.rows],
      ['u32', copy.cols],
      ['u32', srcStride],
      ['u32', srcOffset],
      ['u32', dstStride],
      ['u32', dstOffset],
      ['u32', g.rowStride],
    ]),
  });
}

/**
 * dst [rows, 3·cols] = [a | b | c] row by row, from three [rows, cols] buffers, in one dispatch
 * (GPT-2's attention backward: dq, dk, dv into c_attn's layout).
 */
export async function planInterleave3(
  ctx: GpuContext,
  srcs: readonly [Tensor, Tensor, Tensor],
  dst: Tensor,
  dims: { rows: number; cols: number },
  label = 'interleave3',
): Promise<Dispatch> {
  const { rows, cols } = dims;
  for (const t of srcs) {
    if (t.dtype !== 'f32' || t.size !== rows * cols)
      throw new ShapeError(`${label}: ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 [${rows}, ${cols}]`);
  }
  if (dst.dtype !== 'f32' || dst.size !== 3 * rows * cols)
    throw new ShapeError(
      `${label}: ${dst.label} ${dst.dtype}${formatShape(dst.shape)} must be f32 [${rows}, ${3 * cols}]`,
    );
  const { kernel, wg } = await elementwiseKernel(ctx, 'interleave3', [
    'uniform',
    'read',
    'none',
    'write',
    'read',
    'read',
  ]);
  const g = grid1d(ctx, 3 * rows * cols, wg);
  return bindKernel(ctx, kernel, {
    label,
    resources: [srcs[0], dst, srcs[1], srcs[2]],
    workgroups: g.workgroups,
    uniforms: packUniforms([
      ['u32', rows],
      ['u32', cols],
      ['u32', 0],
      ['u32', 0],
      ['u32', 0],
      ['u32', 0],
      ['u32', g.rowStride],
    ]),
  });
}
