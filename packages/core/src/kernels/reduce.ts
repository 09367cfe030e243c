import source from '../../../../shaders/reduce.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { withGroupReduce } from './group_reduce.js';
import { isCpuAdapter } from './matmul.js';

/** Elements of a reduction's result: [value, finite flag (1 or 0), count of NaN/±Inf inputs]. */
export const REDUCE_OUT_SIZE = 3;

// group_sum and friends (group_reduce.ts) go before the kernel's own source.
const sources = withGroupReduce('shaders/reduce.wgsl', source);

const spec = (ctx: GpuContext, entryPoint: 'reduce_partial' | 'reduce_final'): KernelSpec => ({
  ...sources(ctx),
  entryPoint,
  bindings: ['uniform', 'read', 'write'],
});

/**
 * How a reduction over n elements is split: `wg` invocations per workgroup, `perThread` serial
 * additions per invocation of the first dispatch, `groups` workgroups (= partial sums) and the
 * scratch size that needs. Real GPUs get 256-wide workgroups, ≥ 8 elements per invocation and up
 * to 16·wg groups (enough to fill the GPU; ≤ 16 partials per invocation of the final stage).
 * Software adapters pay milliseconds per workgroup for the barriers of the workgroup reduction
 * (SwiftShader: ~3 ms at 256 invocations, ~0.3 ms at 64), so they get 64-wide workgroups, ≥ 64
 * elements per invocation and at most 4·wg groups.
 */
export function reducePlan(
  ctx: GpuContext,
  n: number,
): { wg: number; perThread: number; groups: number; partialsSize: number } {
  return reducePlanFor(ctx.limits, isCpuAdapter(ctx), n);
}

/** reducePlan for a device known only by its limits and kind (a memory estimate without a GPU). */
export function reducePlanFor(
  limits: Pick<GPUSupportedLimits, 'maxComputeInvocationsPerWorkgroup' | 'maxComputeWorkgroupSizeX'>,
  cpu: boolean,
  n: number,
): { wg: number; perThread: number; groups: number; partialsSize: number } {
  const cap = Math.min(cpu ? 64 : 256, limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX);
  let wg = 1;
  while (wg * 2 <= cap) wg *= 2;
  const maxGroups = (cpu ? 4 : 16) * wg;
  const perThread = Math.max(cpu ? 64 : 8, Math.ceil(n / (wg * maxGroups)));
  const groups = Math.max(1, Math.ceil(n / (wg * perThread)));
  return { wg, perThread, groups, partialsSize: 2 * groups };
}

/** Elements of the f32 scratch tensor (`partials`) that a reduction over n elements needs. */
export function reducePartialsSize(ctx: GpuContext, n: number): number {
  return reducePlan(ctx, n).partialsSize;
}

export interface ReduceBuffers {
  /** [n] f32, read. Any shape; its elements are reduced as one flat array. */
  readonly x: Tensor;
  /** f32 scratch of at least reducePartialsSize(ctx, x.size) elements, overwritten. */
  readonly partials: Tensor;
  /** [3] f32, written: [value, finite (1 or 0), number of NaN/±Inf elements]. */
  readonly out: Tensor;
}

function check(ctx: GpuContext, op: string, b: ReduceBuffers): ReturnType<typeof reducePlan> {
  for (const [name, t] of [
    ['x', b.x],
    ['partials', b.partials],
    ['out', b.out],
  ] as const) {
    if (t.dtype !== 'f32') throw new ShapeError(`${op}: ${name} ${t.label} is ${t.dtype}, must be f32`);
  }
  const plan = reducePlan(ctx, b.x.size);
  if (b.partials.size < plan.partialsSize) {
    throw new ShapeError(
      `${op}: partials ${b.partials.label} ${formatShape(b.partials.shape)} has ${b.partials.size} elements, ` +
        `x ${b.x.label} ${formatShape(b.x.shape)} needs ${plan.partialsSize} (reducePartialsSize)`,
    );
  }
  if (b.out.size !== REDUCE_OUT_SIZE) {
    throw new ShapeError(
      `${op}: out ${b.out.label} ${formatShape(b.out.shape)} must have ${REDUCE_OUT_SIZE} elements [value, finite, non-finite count]`,
    );
  }
  if (b.partials.buffer === b.x.buffer || b.partials.buffer === b.out.buffer) {
    throw new ShapeError(`${op}: partials ${b.partials.label} must not share a buffer with x or out`);
  }
  return plan;
}

async function planReduce(ctx: GpuContext, b: ReduceBuffers, square: boolean, label: string): Promise<Dispatch[]> {
  const plan = check(ctx, label, b);
  const constants = { WG: plan.wg };
  const [partial, final] = await Promise.all([
    getKernel(ctx, spec(ctx, 'reduce_partial'), constants),
    getKernel(ctx, spec(ctx, 'reduce_final'), constants),
  ]);
  const uniforms = packUniforms([
    ['u32', b.x.size],
    ['u32', plan.perThread],
    ['u32', plan.groups],
    ['u32', square ? 1 : 0],
  ]);
  return [
    bindKernel(ctx, partial, {
      label: `${label}.partial`,
      resources: [b.x, b.partials],
      workgroups: [plan.groups],
      uniforms,
    }),
    bindKernel(ctx, final, { label: `${label}.final`, resources: [b.partials, b.out], workgroups: [1], uniforms }),
  ];
}

/**
 * The L2 norm of all of x (for the gradient arena: clip_grad_norm_'s total norm; the zero padding
 * between the arena's tensors adds nothing). Two dispatches, to record in this order in one step;
 * `out` = [norm, finite flag, non-finite count] stays on the GPU for adamw.wgsl to read.
 */
export function planL2Norm(ctx: GpuContext, b: ReduceBuffers, label = 'norm'): Promise<Dispatch[]> {
  return planReduce(ctx, b, true, label);
}

/** The sum of all of x (for instance per-token losses): out = [sum, finite flag, non-finite count]. */
export function planSum(ctx: GpuContext, b: ReduceBuffers, label = 'sum'): Promise<Dispatch[]> {
  return planReduce(ctx, b, false, label);
}
