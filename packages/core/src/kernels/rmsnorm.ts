import source from '../../../../shaders/rmsnorm.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { withGroupReduce } from './group_reduce.js';
import { isCpuAdapter } from './matmul.js';

const BINDINGS = {
  rmsnorm_fwd: ['uniform', 'read', 'read', 'write', 'write'],
  rmsnorm_fwd_copy: ['uniform', 'read', 'read', 'write', 'write', 'write'],
  rmsnorm_fwd_lora: ['uniform', 'read', 'read', 'write', 'write', 'write', 'read', 'write'],
  rmsnorm_bwd: ['uniform', 'read', 'read', 'read', 'read', 'write'],
} as const;

// group_sum and friends (group_reduce.ts) go before the kernel's own source.
const sources = withGroupReduce('shaders/rmsnorm.wgsl', source);

const spec = (ctx: GpuContext, entryPoint: keyof typeof BINDINGS): KernelSpec => ({
  ...sources(ctx),
  entryPoint,
  bindings: BINDINGS[entryPoint],
});

/**
 * How a normalised row sits in its buffer. Row r = o·groups + g starts at
 * o·stride + offset + g·d (o: the token, g: the head when groups > 1).
 */
export interface NormRowLayout {
  /** Elements from one outer row to the next. Default groups·d (rows packed back to back). */
  readonly stride?: number;
  /** Element offset of group 0 within an outer row. Default 0. */
  readonly offset?: number;
}

/**
 * How the row-reduction kernels (rmsnorm, layernorm) split a row: 'tree' gives a row TPR
 * invocations whose partial sums meet in group_sum (subgroup operations, or workgroup memory;
 * GPUs); 'rows' gives each row one invocation and uses no workgroup memory or barrier (CPU
 * adapters, where every workgroup that has them costs about 10 µs per four invocations on
 * SwiftShader and a lane is just a SIMD lane).
 */
export type NormSplit = 'tree' | 'rows';

/** The split the planners use on this device unless told otherwise. */
export function normSplit(ctx: GpuContext): NormSplit {
  return isCpuAdapter(ctx) ? 'rows' : 'tree';
}

/**
 * Workgroup shape shared by the row-reduction kernels (rmsnorm, layernorm): TPR invocations per
 * row, WG/TPR rows per workgroup, the workgroups spread over a 2-D grid. Few shapes (one
 * invocation per row; short rows such as one head; long rows such as a hidden state): each is
 * another pipeline to compile.
 */
export function rowReduceShape(
  ctx: GpuContext,
  rows: number,
  d: number,
  split: NormSplit = normSplit(ctx),
): { wg: number; tpr: number; workgroups: [number, number]; gridX: number } {
  let wg = 1;
  const most = split === 'rows' ? 64 : 256;
  while (wg * 2 <= Math.min(most, ctx.limits.maxComputeInvocationsPerWorkgroup)) wg *= 2;
  const tpr = split === 'rows' ? 1 : d <= 256 ? Math.min(32, wg) : wg;
  const groups = Math.ceil(rows / (wg / tpr));
  const gridX = Math.min(groups, ctx.limits.maxComputeWorkgroupsPerDimension);
  return { wg, tpr, workgroups: [gridX, Math.ceil(groups / gridX)], gridX };
}

/** Checks that `t` (f32) holds `rows` rows of `d` in `layout`; returns the resolved stride and offset. */
export function checkNormRows(
  op: string,
  name: string,
  t: Tensor,
  rows: number,
  d: number,
  groups: number,
  layout: NormRowLayout | undefined,
): { stride: number; offset: number } {
  if (t.dtype !== 'f32') throw new ShapeError(`${op}: ${name} ${t.label} is ${t.dtype}, must be f32`);
  const stride = layout?.stride ?? groups * d;
  const offset = layout?.offset ?? 0;
  if (!Number.isSafeInteger(stride) || !Number.isSafeInteger(offset) || offset < 0 || offset + groups * d > stride) {
    throw new ShapeError(
      `${op}: ${name} layout (stride ${stride}, offset ${offset}) cannot hold ${groups} group(s) of ${d} per outer row`,
    );
  }
  const extent = (rows / groups - 1) * stride + offset + groups * d;
  if (layout === undefined ? t.size !== rows * d : t.size < extent) {
    throw new ShapeError(
      `${op}: ${name} ${t.label} ${formatShape(t.shape)} has ${t.size} elements, ` +
        (layout === undefined
          ? `expected ${rows} rows × ${d} = ${rows * d}`
          : `the layout (stride ${stride}, offset ${offset}) needs ${extent}`),
    );
  }
  return { stride, offset };
}

export interface RmsNormOptions {
  /** Added to the mean square: config.rms_norm_eps (1e-5 Llama, 1e-6 Qwen). */
  readonly eps: number;
  /** Rows per outer row, d apart (heads per token for Qwen3's q_norm/k_norm). Default 1. */
  readonly groups?: number;
  /** Layout of x (and dx in the backward). Default: [rows, d] packed. */
  readonly xLayout?: NormRowLayout;
  /** Layout of y (and dy in the backward). Default: [rows, d] packed. */
  readonly yLayout?: NormRowLayout;
  readonly label?: string;
  /** Work split; default normSplit(ctx). Tests set it to run both on any adapter. */
  readonly split?: NormSplit;
}

export interface RmsNormForwardBuffers {
  readonly x: Tensor;
  /** [d] f32, frozen. d is read from its size. */
  readonly w: Tensor;
  /** [rows, d] f32 (or per yLayout), written. */
  readonly y: Tensor;
  /** [rows] f32, written: saved for the backward. The number of rows is read from its size. */
  readonly rstd: Tensor;
  /** Written when given: a copy of x in x's layout (where a transformer layer's next projection
   * accumulates its output: the residual add). Must not be x. */
  readonly xCopy?: Tensor;
  /** The LoRA h = y·Aᵀ of two or three projections that read y, computed in the same dispatch
   * (rmsnormLoraFits). */
  readonly lora?: readonly RmsNormLoraH[];
}

/** One adapted projection reading a norm's output: its A (r×d, f32) and its h ([rows, r], written). */
export interface RmsNormLoraH {
  readonly a: Tensor;
  readonly h: Tensor;
}

/**
 * Whether planRmsNormForward can compute these projections' LoRA h in the norm's dispatch
 * (rmsnorm_fwd_lora) for rows of d: two or three, their A f32 r×d places in one buffer (the
 * trainer's arena of LoRA parameters), their h disjoint places in another (the layer's h arena),
 * each buffer within one binding, so the entry stays within seven storage buffers.
 */
export function rmsnormLoraFits(lora: readonly RmsNormLoraH[], d: number): boolean {
  const [first] = lora;
  if (!first || lora.length < 2 || lora.length > 3) return false;
  const max = first.a.ctx.limits.maxStorageBufferBindingSize;
  const shaped = (t: Tensor) => t.dtype === 'f32' && t.shape.length === 2 && t.shape[1] === d;
  const apart = lora.every((m, i) =>
    lora.every(
      (o, j) =>
        j <= i ||
        m.h.byteOffset + m.h.byteLength <= o.h.byteOffset ||
        o.h.byteOffset + o.h.byteLength <= m.h.byteOffset,
    ),
  );
  return (
    lora.every((m) => shaped(m.a) && m.a.buffer === first.a.buffer && m.h.buffer === first.h.buffer) &&
    first.a.buffer !== first.h.buffer &&
    apart &&
    first.a.buffer.size <= max &&
    first.h.buffer.size <= max
  );
}

export interface RmsNormBackwardBuffers {
  readonly x: Tensor;
  readonly w: Tensor;
  /** [rows] from the forward. */
  readonly rstd: Tensor;
  readonly dy: Tensor;
  /** Same layout as x; written, or accumulated with `accumulate`. */
  readonly dx: Tensor;
}

interface Resolved {
  rows: number;
  d: number;
  groups: number;
  x: { stride: number; offset: number };
  y: { stride: number; offset: number };
}

function resolve(op: string, w: Tensor, rstd: Tensor, opts: RmsNormOptions, x: Tensor, y: Tensor, yName: string) {
  if (w.dtype !== 'f32' || rstd.dtype !== 'f32') throw new ShapeError(`${op}: w and rstd must be f32`);
  if (!Number.isFinite(opts.eps) || opts.eps < 0) throw new ShapeError(`${op}: eps ${opts.eps} must be ≥ 0`);
  const d = w.size;
  const rows = rstd.size;
  const groups = opts.groups ?? 1;
  if (!Number.isSafeInteger(groups) || groups < 1 || rows % groups !== 0) {
    throw new ShapeError(`${op}: groups ${groups} must divide the ${rows} rows of rstd ${formatShape(rstd.shape)}`);
  }
  const r: Resolved = {
    rows,
    d,
    groups,
    x: checkNormRows(op, 'x', x, rows, d, groups, opts.xLayout),
    y: checkNormRows(op, yName, y, rows, d, groups, opts.yLayout),
  };
  return r;
}

function uniforms(
  r: Resolved,
  eps: number,
  accumulate: boolean,
  gridX: number,
  lora: { r: readonly number[]; a: readonly number[]; h: readonly number[]; copy: boolean } = {
    r: [],
    a: [],
    h: [],
    copy: false,
  },
): ArrayBuffer {
  return packUniforms([
    ['u32', r.rows],
    ['u32', r.d],
    ['u32', r.groups],
    ['u32', r.x.stride],
    ['u32', r.x.offset],
    ['u32', r.y.stride],
    ['u32', r.y.offset],
    ['f32', eps],
    ['u32', accumulate ? 1 : 0],
    ['u32', gridX],
    ...[0, 1, 2].map((i) => ['u32', lora.r[i] ?? 0] as const),
    ...[0, 1, 2].map((i) => ['u32', lora.a[i] ?? 0] as const),
    ...[0, 1, 2].map((i) => ['u32', lora.h[i] ?? 0] as const),
    ['u32', lora.copy ? 1 : 0],
  ]);
}

/** y = w · x · rstd per row, saving rstd (and copying x to xCopy when given; and the LoRA h of
 * `io.lora`). One dispatch. */
export async function planRmsNormForward(
  ctx: GpuContext,
  io: RmsNormForwardBuffers,
  opts: RmsNormOptions,
): Promise<Dispatch> {
  const label = opts.label ?? 'rmsnorm';
  const r = resolve(`${label}.forward`, io.w, io.rstd, opts, io.x, io.y, 'y');
  if (io.xCopy) checkNormRows(`${label}.forward`, 'xCopy', io.xCopy, r.rows, r.d, r.groups, opts.xLayout);
  const shape = rowReduceShape(ctx, r.rows, r.d, opts.split);
  if (io.lora) {
    const op = `${label}.forward`;
    if (r.groups !== 1 || opts.xLayout || opts.yLayout)
      throw new ShapeError(`${op}: the LoRA h need packed rows (no groups, strides or offsets)`);
    const ranks = io.lora.map(({ a, h }) => {
      const R = a.shape[0] as number;
      if (a.dtype !== 'f32' || a.shape.length !== 2 || a.shape[1] !== r.d || R < 1)
        throw new ShapeError(`${op}: A ${a.label} ${a.dtype}${formatShape(a.shape)} must be f32 r×${r.d}`);
      if (h.dtype !== 'f32' || h.size !== r.rows * R || h.shape[h.shape.length - 1] !== R)
        throw new ShapeError(`${op}: h ${h.label} ${h.dtype}${formatShape(h.shape)} must be f32 ${r.rows}×${R}`);
      return R;
    });
    if (!rmsnormLoraFits(io.lora, r.d))
      throw new ShapeError(
        `${op}: two or three modules, A ${io.lora.map((m) => m.a.label).join(', ')} places of one buffer and h ${io.lora.map((m) => m.h.label).join(', ')} disjoint places of another, each within the binding size limit`,
      );
    const kernel = await getKernel(ctx, spec(ctx, 'rmsnorm_fwd_lora'), { WG: shape.wg, TPR: shape.tpr });
    const [m1] = io.lora as [RmsNormLoraH];
    return bindKernel(ctx, kernel, {
      label,
      resources: [io.x, io.w, io.rstd, io.y, io.xCopy ?? ctx.placeholder('write'), m1.a.buffer, m1.h.buffer],
      workgroups: shape.workgroups,
      uniforms: uniforms(r, opts.eps, false, shape.gridX, {
        r: ranks,
        a: io.lora.map((m) => m.a.byteOffset / 4),
        h: io.lora.map((m) => m.h.byteOffset / 4),
        copy: io.xCopy !== undefined,
      }),
    });
  }
  const entry = io.xCopy ? 'rmsnorm_fwd_copy' : 'rmsnorm_fwd';
  const kernel = await getKernel(ctx, spec(ctx, entry), { WG: shape.wg, TPR: shape.tpr });
  return bindKernel(ctx, kernel, {
    label,
    resources: [io.x, io.w, io.rstd, io.y, ...(io.xCopy ? [io.xCopy] : [])],
    workgroups: shape.workgroups,
    uniforms: uniforms(r, opts.eps, false, shape.gridX),
  });
}

/**
 * dx from dy, x, w and the saved rstd. The weight is frozen: no dw. With `accumulate`, dx += the
 * gradient (the residual stream's gradient adds up). One dispatch.
 */
export async function planRmsNormBackward(
  ctx: GpuContext,
  io: RmsNormBackwardBuffers,
  opts: RmsNormOptions & { readonly accumulate?: boolean },
): Promise<Dispatch> {
  const label = opts.label ?? 'rmsnorm';
  const op = `${label}.backward`;
  const r = resolve(op, io.w, io.rstd, opts, io.x, io.dy, 'dy');
  checkNormRows(op, 'dx', io.dx, r.rows, r.d, r.groups, opts.xLayout);
  const shape = rowReduceShape(ctx, r.rows, r.d, opts.split);
  const kernel = await getKernel(ctx, spec(ctx, 'rmsnorm_bwd'), { WG: shape.wg, TPR: shape.tpr });
  return bindKernel(ctx, kernel, {
    label: `${label}.dx`,
    resources: [io.x, io.w, io.rstd, io.dy, io.dx],
    workgroups: shape.workgroups,
    uniforms: uniforms(r, opts.eps, opts.accumulate ?? false, shape.gridX),
  });
}
