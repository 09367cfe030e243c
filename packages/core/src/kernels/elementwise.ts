import source from '../../../../shaders/elementwise.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';

/** Spreads `n` invocations over a 2-D grid of `wg`-wide workgroups within the per-dimension limit. */
export function grid1d(ctx: GpuContext, n: number, wg: number): { workgroups: [number, number]; rowStride: number } {
  const groups = Math.max(1, Math.ceil(n / wg));
  const max = ctx.limits.maxComputeWorkgroupsPerDimension;
  const x = Math.min(groups, max);
  return { workgroups: [x, Math.ceil(groups / x)], rowStride: x * wg };
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
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const kernel = await getKernel(
    ctx,
    {
      source,
      file: 'shaders/elementwise.wgsl',
      entryPoint: 'add_scaled',
      bindings: ['uniform', 'read', 'read', 'write'],
    },
    { WG: wg },
  );
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
