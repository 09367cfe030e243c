import source from '../../../../shaders/lora_matmul.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import {
  bindKernel,
  type Dispatch,
  getKernel,
  type Kernel,
  type KernelSpec,
  packUniforms,
  type Resource,
} from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { type DropoutMask, planDropout } from './dropout.js';
import { withGroupReduce } from './group_reduce.js';
import {
  isCpuAdapter,
  lossScaledTiles,
  type MatmulActivation,
  type MatmulActivationBackward,
  type MatmulOptions,
  type MatmulRope,
  planMatmul,
  type TileMath,
} from './matmul.js';

// Bindings 4..7 are roles 1 and 2 of the multi-role entries (lora_g_db, lora_rows_multi,
// lora_cols_multi), binding 8 the second dy of lora_g_db_pair; entries that use fewer get
// placeholders there.
const BINDINGS = ['uniform', 'read', 'read', 'write', 'read', 'write', 'read', 'write', 'read'] as const;
/** Roles in lora_matmul.wgsl's Params (NROLES). */
const ROLES = 6;
// lora_rows adds up its partial sums with group_sum4x4 (group_reduce.ts): the subgroup build
// where the device has them.
const sources = withGroupReduce('shaders/lora_matmul.wgsl', source);
const spec = (ctx: GpuContext, entryPoint: string): KernelSpec => ({
  ...sources(ctx),
  entryPoint,
  bindings: BINDINGS,
});

/** One LoRA-adapted linear layer: y = x·W0ᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias). */
export interface LoraLayer {
  /** Frozen base weight, out×in, f32 or packed f16. */
  readonly w0: Tensor;
  /** r×in, f32. */
  readonly a: Tensor;
  /** out×r, f32. */
  readonly b: Tensor;
  /** out, f32; frozen. */
  readonly bias?: Tensor;
  /** lora_alpha / r, or lora_alpha / √r with rsLoRA. */
  readonly scale: number;
}

export interface LoraShape {
  readonly T: number;
  readonly inF: number;
  readonly outF: number;
  readonly r: number;
}

/** Reads the layer's dimensions and checks every weight against them. */
export function loraShape(layer: LoraLayer, x: Tensor, op = 'lora'): LoraShape {
  const { w0, a, b } = layer;
  if (w0.shape.length !== 2)
    throw new ShapeError(`${op}: W0 ${w0.label} must be 2-D (out×in), got ${formatShape(w0.shape)}`);
  const [outF, inF] = w0.shape as [number, number];
  if (a.shape.length !== 2 || a.shape[1] !== inF) {
    throw new ShapeError(
      `${op}: A ${a.label} ${formatShape(a.shape)} must be r×${inF} to match W0 ${formatShape(w0.shape)}`,
    );
  }
  const r = a.shape[0] as number;
  if (b.shape.length !== 2 || b.shape[0] !== outF || b.shape[1] !== r) {
    throw new ShapeError(
      `${op}: B ${b.label} ${formatShape(b.shape)} must be ${outF}×${r} to match W0 ${formatShape(w0.shape)} and A ${formatShape(a.shape)}`,
    );
  }
  if (a.dtype !== 'f32' || b.dtype !== 'f32') throw new ShapeError(`${op}: A and B must be f32`);
  if (!Number.isFinite(layer.scale)) throw new ShapeError(`${op}: scale ${layer.scale} is not finite`);
  const xin = x.shape[x.shape.length - 1] as number;
  if (xin !== inF)
    throw new ShapeError(
      `${op}: x ${x.label} ${formatShape(x.shape)} has ${xin} features, W0 ${formatShape(w0.shape)} takes ${inF}`,
    );
  return { T: x.size / inF, inF, outF, r };
}

function expectRows(op: string, t: Tensor, rows: number, cols: number, what: string): void {
  if (t.size !== rows * cols || t.shape[t.shape.length - 1] !== cols || t.dtype !== 'f32') {
    throw new ShapeError(`${op}: ${what} ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 ${rows}×${cols}`);
  }
}

/** One role of lora_matmul.wgsl's Params: a product's rank, length, workgroups and coefficients. */
interface RoleParams {
  readonly R: number;
  /** lora_g_db_pair, lora_g_db_many: the role's K (lora_rows) or N (lora_cols); the other entries
   * take Params' K and N, uniform over the dispatch. */
  readonly n?: number;
  readonly alpha: number;
  readonly beta: number;
  /** First workgroup (flat), grid width and workgroup count: multi-role entries only. */
  readonly start?: number;
  readonly gx?: number;
  readonly count?: number;
  /** Where the role's L (or V) and its output start in their bindings, in elements. */
  readonly inOff?: number;
  readonly outOff?: number;
  /** lora_g_db_many: where its X (or U) starts in x, in elements. */
  readonly xOff?: number;
}

/** lora_matmul.wgsl's Params: the shape, the grid width and the roles. */
function params(d: { M: number; N?: number; K?: number; gridX?: number }, roles: readonly RoleParams[]): ArrayBuffer {
  const fields: ['u32' | 'f32', number][] = [
    ['u32', d.M],
    ['u32', d.N ?? 0],
    ['u32', d.K ?? 0],
    ['u32', d.gridX ?? 0],
  ];
  for (let i = 0; i < ROLES; i++) {
    const r = roles[i];
    fields.push(
      ['u32', r?.R ?? 0],
      ['u32', r?.start ?? 0],
      ['u32', r?.gx ?? 0],
      ['u32', r?.count ?? 0],
      ['f32', r?.alpha ?? 0],
      ['f32', r?.beta ?? 0],
      ['u32', r?.inOff ?? 0],
      ['u32', r?.outOff ?? 0],
      ['u32', r?.n ?? 0],
      ['u32', r?.xOff ?? 0],
      ['u32', 0],
      ['u32', 0],
    );
  }
  return packUniforms(fields);
}

/** The placeholders of the roles a dispatch does not use (bindings 4..7), and of the second dy
 * (binding 8). */
function unusedRoles(ctx: GpuContext, used: number): GPUBuffer[] {
  const out: GPUBuffer[] = [];
  for (let r = Math.max(used, 1); r < 3; r++) out.push(ctx.placeholder(), ctx.placeholder('write', r));
  return [...out, ctx.placeholder()];
}

/**
 * Binds a multi-role entry (lora_g_db, lora_rows_multi, lora_cols_multi): x, then each role's L (or
 * V) and output; each role's gx × gy workgroups laid out flat, in order, over a 2-D grid within the
 * device's per-dimension limit; and the roles' parameters.
 */
function bindRoles(
  ctx: GpuContext,
  kernel: Kernel,
  label: string,
  x: Tensor,
  shape: { M: number; N: number; K: number },
  roles: readonly (LoraRole & { gx: number; gy: number })[],
): Dispatch {
  if (roles.length < 1 || roles.length > 3) throw new ShapeError(`${label}: 1 to 3 modules, got ${roles.length}`);
  let total = 0;
  const starts = roles.map((r) => {
    const start = total;
    total += r.gx * r.gy;
    return start;
  });
  const gridX = Math.max(1, Math.min(total, ctx.limits.maxComputeWorkgroupsPerDimension));
  return bindKernel(ctx, kernel, {
    label,
    resources: [x, ...roles.flatMap((r) => [r.l, r.out]), ...unusedRoles(ctx, roles.length)],
    workgroups: [gridX, Math.ceil(total / gridX)],
    uniforms: params(
      { ...shape, gridX },
      roles.map((r, i) => ({
        R: r.R,
        alpha: r.alpha ?? 1,
        beta: r.beta ?? 0,
        start: starts[i],
        gx: r.gx,
        count: r.gx * r.gy,
      })),
    ),
  });
}

function rowsWorkgroup(ctx: GpuContext): number {
  return Math.min(64, ctx.limits.maxComputeInvocationsPerWorkgroup);
}

/**
 * How lora_rows reduces its long dimension: 'tree' splits it over a workgroup whose partial sums
 * meet in group_sum4x4 (subgroup sums where the device has them, else workgroup memory; GPUs);
 * 'serial' gives each 4×4 block of C one invocation that walks the whole of it, with no barrier
 * (CPU adapters, where a workgroup with barriers costs about 10 µs per four invocations on
 * SwiftShader). The serial build still declares group_sum4x4's workgroup memory (1 KiB or less),
 * which it never touches.
 */
export type LoraRowsSplit = 'tree' | 'serial';

/** The split lora_rows uses on this device unless told otherwise. */
export function loraRowsSplit(ctx: GpuContext): LoraRowsSplit {
  return isCpuAdapter(ctx) ? 'serial' : 'tree';
}

/**
 * C[M×R] = alpha·X·Lᵀ (L stored R×K, transL) or alpha·X·L (L stored K×R), plus beta·C: the thin
 * products h = x·Aᵀ and g = dy·B. One dispatch.
 */
export async function planLoraRows(
  ctx: GpuContext,
  x: Tensor,
  l: Tensor,
  out: Tensor,
  dims: { M: number; K: number; R: number },
  transL: boolean,
  label: string,
  opts: { alpha?: number; beta?: number; split?: LoraRowsSplit } = {},
): Promise<Dispatch> {
  const split = opts.split ?? loraRowsSplit(ctx);
  // serial: 16 invocations, each a 4×4 block; tree: one block per workgroup of WG invocations.
  const wg = split === 'serial' ? Math.min(16, ctx.limits.maxComputeInvocationsPerWorkgroup) : rowsWorkgroup(ctx);
  const ks = split === 'serial' ? 1 : wg;
  const kernel = await getKernel(ctx, spec(ctx, 'lora_rows'), { WG: wg, KS: ks, TRANS_L: transL });
  return bindKernel(ctx, kernel, {
    label,
    resources: [x, l, out, ...unusedRoles(ctx, 1)],
    workgroups: [Math.ceil(dims.R / 4), Math.ceil(dims.M / (4 * (wg / ks)))],
    uniforms: params({ M: dims.M, K: dims.K }, [{ R: dims.R, alpha: opts.alpha ?? 1, beta: opts.beta ?? 0 }]),
  });
}

/**
 * C = alpha·Uᵀ·V (+ beta·C) for U (T×N), V (T×R), written N×R (outNR) or R×N: the LoRA weight
 * gradients dB = s·dyᵀ·h (outNR) and dA = s·gᵀ·x, reduced over the T tokens. `opts.stage`
 * forces the V staging on or off (default: on except on CPU adapters); tests run both.
 */
export async function planLoraWeightGrad(
  ctx: GpuContext,
  u: Tensor,
  v: Tensor,
  out: Tensor,
  dims: { T: number; N: number; R: number },
  outNR: boolean,
  alpha: number,
  beta: number,
  label: string,
  opts: { stage?: boolean } = {},
): Promise<Dispatch> {
  // Stage V rows in workgroup memory on GPUs; on CPU adapters every invocation reads its own
  // (no workgroup memory, no barrier) and smaller workgroups spread the columns over the cores.
  const stage = opts.stage ?? !isCpuAdapter(ctx);
  const wg = stage ? rowsWorkgroup(ctx) : Math.min(16, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const entry = dims.N % 4 === 0 ? 'lora_cols_vec4' : 'lora_cols';
  const kernel = await getKernel(ctx, spec(ctx, entry), { WG: wg, OUT_NR: outNR, TT: 16, STAGE: stage });
  return bindKernel(ctx, kernel, {
    label,
    resources: [u, v, out, ...unusedRoles(ctx, 1)],
    workgroups: [Math.ceil(dims.N / (4 * wg)), Math.ceil(dims.R / 4)],
    uniforms: params({ M: dims.T, N: dims.N }, [{ R: dims.R, alpha, beta }]),
  });
}

/**
 * g = dy·B (T×r) and dB = alpha·dyᵀ·h (+ beta·dB, out×r) in one dispatch (lora_g_db): lora_rows'
 * blocks for g and lora_cols' for dB, each in the work split planLoraRows and planLoraWeightGrad
 * would use on this device.
 */
export async function planLoraGradGdB(
  ctx: GpuContext,
  io: { dy: Tensor; b: Tensor; h: Tensor; g: Tensor; db: Tensor },
  dims: { T: number; N: number; R: number },
  alpha: number,
  beta: number,
  label: string,
): Promise<Dispatch> {
  const { wg, ks, stage } = multiSplit(ctx);
  const kernel = await getKernel(ctx, spec(ctx, 'lora_g_db'), {
    WG: wg,
    KS: ks,
    TRANS_L: false,
    OUT_NR: true,
    TT: 16,
    STAGE: stage,
  });
  return bindRoles(ctx, kernel, label, io.dy, { M: dims.T, N: dims.N, K: dims.N }, [
    // g: lora_rows' blocks (x = dy, L = B)
    { l: io.b, out: io.g, R: dims.R, gx: Math.ceil(dims.R / 4), gy: Math.ceil(dims.T / (4 * (wg / ks))) },
    // dB: lora_cols' blocks (U = dy, V = h)
    { l: io.h, out: io.db, R: dims.R, alpha, beta, gx: Math.ceil(dims.N / (4 * wg)), gy: Math.ceil(dims.R / 4) },
  ]);
}

/** One module of planLoraGradGdBPair: its dy (T×N), B (N×r), h and g (T×r), dB (N×r) and
 * lora_alpha / r. */
export interface LoraGradModule {
  readonly dy: Tensor;
  readonly b: Tensor;
  readonly h: Tensor;
  readonly g: Tensor;
  readonly db: Tensor;
  readonly scale: number;
}

/**
 * Whether two modules' g and dB can be one lora_g_db_pair dispatch: their B are places in one
 * buffer (the LoRA parameters' arena) and so are their dB (the gradients'), so the kernel binds
 * each buffer once, whole, and addresses the modules by offset; each buffer within the device's
 * binding size (an arena over it would take more than 32M LoRA parameters).
 */
export function loraGradPairable(a: LoraGradModule, b: LoraGradModule): boolean {
  const max = a.b.ctx.limits.maxStorageBufferBindingSize;
  // Two places of one buffer that overlap would be one module twice: its dB written by both roles.
  const apart = (x: Tensor, y: Tensor) =>
    x.byteOffset + x.byteLength <= y.byteOffset || y.byteOffset + y.byteLength <= x.byteOffset;
  return (
    a.b.buffer === b.b.buffer &&
    a.db.buffer === b.db.buffer &&
    a.b.buffer !== a.db.buffer &&
    apart(a.db, b.db) &&
    a.b.buffer.size <= max &&
    a.db.buffer.size <= max
  );
}

/**
 * The largest rank whose g and dB planLoraBackward forms in one dispatch (lora_g_db) on this
 * device; above it they are two (g by the thin kernel, dB by planLoraWeightGrad). On GPUs every
 * rank. On CPU adapters 16: lora_g_db forms g with lora_rows' blocks, which at r = 64 cost more
 * than the tiled matmul the CPU's thin kernel is plus the dispatch saved. `pnpm bench --suite
 * kernels --adapter lavapipe,swiftshader --only lora_fwd_bwd`, the fused layer with g and dB in one
 * against apart, 6 rounds, T = 512, d = 576, 960, 2048 (2026-12-07): r = 64 lavapipe 0.91 (p 0.031),
 * 0.96, 0.95, SwiftShader 0.97, 0.95, 0.94; r = 16 0.97–1.02 on both (none settled).
 */
export const LORA_GDB_CPU_MAX_RANK = 16;

/** LORA_GDB_CPU_MAX_RANK's rule for this device: the largest rank with g and dB in one dispatch. */
export function loraGdBMaxRank(ctx: GpuContext): number {
  return loraGdBMaxRankFor(isCpuAdapter(ctx));
}

/** loraGdBMaxRank where there is no device, only whether it is a CPU adapter (estimateMemory). */
export function loraGdBMaxRankFor(cpu: boolean): number {
  return cpu ? LORA_GDB_CPU_MAX_RANK : Number.POSITIVE_INFINITY;
}

/**
 * Whether the planners use lora_g_db_pair on this device: on GPUs, one dispatch fewer per pair.
 * Not on CPU adapters, where it measured slower than the two lora_g_db it replaces (SwiftShader,
 * T=512, N=576 and 192, r=8: 27.8 against 18.3 ms, min of 25): each role's K, N and offsets come
 * from private variables there, which a CPU driver treats as varying per SIMD lane.
 */
export function loraGradPairPays(ctx: GpuContext): boolean {
  return !isCpuAdapter(ctx);
}

/**
 * planLoraGradGdB for two modules in one dispatch (lora_g_db_pair): g_i = dy_i·B_i and
 * dB_i = s_i·dy_iᵀ·h_i (+ beta·dB_i). Their dy, h and g are bound one by one (the two g may be
 * disjoint places of one buffer, as the backward's g slots are), their B and dB places in two
 * shared buffers (loraGradPairable). Eight storage buffers, WebGPU's default limit.
 */
export async function planLoraGradGdBPair(
  ctx: GpuContext,
  modules: readonly [LoraGradModule, LoraGradModule],
  T: number,
  beta: number,
  label: string,
): Promise<Dispatch> {
  const [m1, m2] = modules;
  if (!loraGradPairable(m1, m2))
    throw new ShapeError(
      `${label}: B ${m1.b.label} and ${m2.b.label} (and dB ${m1.db.label}, ${m2.db.label}) must be separate places in one buffer each`,
    );
  // x dy₁, l B arena, out g₁, hv h₁, db dB arena, l3 h₂, out3 g₂, x2 dy₂
  const resources = [m1.dy, m1.b.buffer, m1.g, m1.h, m1.db.buffer, m2.h, m2.g, m2.dy];
  return bindGradModules(ctx, 'lora_g_db_pair', modules, T, beta, label, resources);
}

/**
 * Why lora_g_db_many cannot take these modules' g and dB as they lie, or undefined when it can: two
 * or three modules whose dy are places of one buffer (the attention gradients' arena), and so are
 * their B (the LoRA parameters'), h (the layer's), g (the backward's g arena) and dB (the
 * gradients'); g and dB places apart; each buffer within one binding.
 */
export function loraGradManyRefusal(modules: readonly LoraGradModule[]): string | undefined {
  const first = modules[0];
  if (!first || modules.length < 2 || modules.length > 3) return `${modules.length} modules, not two or three`;
  const max = first.b.ctx.limits.maxStorageBufferBindingSize;
  for (const key of ['dy', 'b', 'h', 'g', 'db'] as const) {
    const stray = modules.find((m) => m[key].buffer !== first[key].buffer);
    if (stray) return `${key} ${stray[key].label} is not in ${first[key].label}'s buffer`;
    if (first[key].buffer.size > max) return `${key}'s buffer ${first[key].buffer.label} exceeds one binding`;
  }
  // WebGPU lets no buffer be bound read-only and writable in one dispatch.
  const written = [first.g.buffer, first.db.buffer];
  const read = (['dy', 'b', 'h'] as const).find((key) => written.includes(first[key].buffer));
  if (read) return `${read} ${first[read].label} shares a buffer with the g or dB written`;
  if (first.g.buffer === first.db.buffer) return `g and dB share a buffer`;
  for (const key of ['g', 'db'] as const) {
    const spans = modules.map((m) => [m[key].byteOffset, m[key].byteOffset + m[key].byteLength] as const);
    if (spans.some(([s0, e0], i) => spans.some(([s1, e1], j) => j > i && s0 < e1 && s1 < e0)))
      return `${key} places overlap`;
  }
  return undefined;
}

/**
 * lora_g_db for two or three modules in one dispatch (lora_g_db_many: q, k and v): g_i = dy_i·B_i
 * and dB_i = s_i·dy_iᵀ·h_i (+ beta·dB_i), every operand kind bound once, whole, and each module's
 * addressed by its offset (loraGradManyRefusal says when they lie so). Where the trainer plans
 * lora_g_db_pair for two, this takes three: one dispatch instead of two.
 */
export async function planLoraGradGdBMany(
  ctx: GpuContext,
  modules: readonly LoraGradModule[],
  T: number,
  beta: number,
  label: string,
): Promise<Dispatch> {
  const refusal = loraGradManyRefusal(modules);
  if (refusal) throw new ShapeError(`${label}: ${refusal}`);
  const first = modules[0] as LoraGradModule;
  // x the dy, l the B, out the g, hv the h, db the dB; l3, out3 and x2 unused
  const resources = [
    first.dy.buffer,
    first.b.buffer,
    first.g.buffer,
    first.h.buffer,
    first.db.buffer,
    ctx.placeholder(),
    ctx.placeholder('write', 1),
    ctx.placeholder(),
  ];
  return bindGradModules(ctx, 'lora_g_db_many', modules, T, beta, label, resources);
}

/**
 * lora_g_db_pair's and lora_g_db_many's common part: checks each module's shapes and scale, and
 * lays out its two roles, g (lora_rows' blocks: X = dy, L = B, K = N) and dB (lora_cols' blocks:
 * U = dy, V = h, stored [n][j]). The pair binds dy, h and g module by module (offset 0 in their
 * bindings), B and dB as arenas; many binds every operand kind as an arena, all at their offsets.
 */
async function bindGradModules(
  ctx: GpuContext,
  entry: 'lora_g_db_pair' | 'lora_g_db_many',
  modules: readonly LoraGradModule[],
  T: number,
  beta: number,
  label: string,
  resources: readonly Resource[],
): Promise<Dispatch> {
  const many = entry === 'lora_g_db_many';
  const dims = modules.map((m) => {
    const [N, R] = m.b.shape as [number, number];
    expectRows(label, m.b, N, R, 'B');
    expectRows(label, m.db, N, R, 'dB');
    expectRows(label, m.dy, T, N, 'dy');
    expectRows(label, m.h, T, R, 'h');
    expectRows(label, m.g, T, R, 'g');
    if (!Number.isFinite(m.scale)) throw new ShapeError(`${label}: scale ${m.scale} is not finite`);
    return { N, R };
  });
  const { wg, ks, stage } = multiSplit(ctx);
  const kernel = await getKernel(ctx, spec(ctx, entry), {
    WG: wg,
    KS: ks,
    TRANS_L: false,
    OUT_NR: true,
    TT: 16,
    STAGE: stage,
    ...(many ? { MANY: true } : { PAIR: true }),
  });
  const rowsGy = Math.ceil(T / (4 * (wg / ks)));
  const roles: RoleParams[] = [];
  let total = 0;
  const place = (r: Omit<RoleParams, 'start' | 'count'>, gy: number) => {
    const gx = r.gx as number;
    roles.push({ ...r, start: total, count: gx * gy });
    total += gx * gy;
  };
  const at = (t: Tensor) => t.byteOffset / 4;
  const arena = (t: Tensor) => (many ? at(t) : 0);
  modules.forEach((m, i) => {
    const { N, R } = dims[i] as { N: number; R: number };
    place(
      { R, n: N, alpha: 1, beta: 0, gx: Math.ceil(R / 4), inOff: at(m.b), outOff: arena(m.g), xOff: arena(m.dy) },
      rowsGy,
    );
    place(
      {
        R,
        n: N,
        alpha: m.scale,
        beta,
        gx: Math.ceil(N / (4 * wg)),
        inOff: arena(m.h),
        outOff: at(m.db),
        xOff: arena(m.dy),
      },
      Math.ceil(R / 4),
    );
  });
  const gridX = Math.max(1, Math.min(total, ctx.limits.maxComputeWorkgroupsPerDimension));
  return bindKernel(ctx, kernel, {
    label,
    resources,
    workgroups: [gridX, Math.ceil(total / gridX)],
    uniforms: params({ M: T, gridX }, roles),
  });
}

/**
 * The work split of the multi-role entries, the same for every role: 16 invocations on CPU
 * adapters (serial lora_rows, unstaged lora_cols), the tree's and the staging's 64 on GPUs.
 */
function multiSplit(ctx: GpuContext): { wg: number; ks: number; stage: boolean } {
  const cpu = isCpuAdapter(ctx);
  const wg = cpu ? Math.min(16, ctx.limits.maxComputeInvocationsPerWorkgroup) : rowsWorkgroup(ctx);
  return { wg, ks: cpu ? 1 : wg, stage: !cpu };
}

/** One module of a multi-role LoRA dispatch: its A (rows) or g (cols), its output and rank. */
export interface LoraRole {
  readonly l: Tensor;
  readonly out: Tensor;
  readonly R: number;
  readonly alpha?: number;
  readonly beta?: number;
}

/**
 * h_i = x·A_iᵀ (T×r_i) for up to three modules reading the same x (q, k and v; gate and up), in
 * one dispatch: lora_rows' blocks, one role per module.
 */
export async function planLoraRowsMulti(
  ctx: GpuContext,
  x: Tensor,
  roles: readonly LoraRole[],
  dims: { M: number; K: number },
  label: string,
): Promise<Dispatch> {
  for (const r of roles) {
    expectRows(label, r.l, r.R, dims.K, 'A');
    expectRows(label, r.out, dims.M, r.R, 'h');
  }
  const { wg, ks } = multiSplit(ctx);
  const kernel = await getKernel(ctx, spec(ctx, 'lora_rows_multi'), { WG: wg, KS: ks, TRANS_L: true });
  const gy = Math.ceil(dims.M / (4 * (wg / ks)));
  return bindRoles(
    ctx,
    kernel,
    label,
    x,
    { M: dims.M, N: 0, K: dims.K },
    roles.map((r) => ({ ...r, gx: Math.ceil(r.R / 4), gy })),
  );
}

/**
 * dA_i = alpha_i·g_iᵀ·x (+ beta_i·dA_i; r_i×N) for up to three modules reading the same x, in one
 * dispatch: lora_cols' blocks, one role per module (`l` is the module's g, T×r_i).
 */
export async function planLoraColsMulti(
  ctx: GpuContext,
  x: Tensor,
  roles: readonly LoraRole[],
  dims: { T: number; N: number },
  label: string,
): Promise<Dispatch> {
  for (const r of roles) {
    expectRows(label, r.l, dims.T, r.R, 'g');
    expectRows(label, r.out, r.R, dims.N, 'dA');
  }
  const { wg, stage } = multiSplit(ctx);
  const kernel = await getKernel(ctx, spec(ctx, 'lora_cols_multi'), { WG: wg, OUT_NR: false, TT: 16, STAGE: stage });
  const gx = Math.ceil(dims.N / (4 * wg));
  return bindRoles(
    ctx,
    kernel,
    label,
    x,
    { M: dims.T, N: dims.N, K: 0 },
    roles.map((r) => ({ ...r, gx, gy: Math.ceil(r.R / 4) })),
  );
}

/**
 * Which kernel computes the thin products h = x·Aᵀ and g = dy·B (T×r): 'rows' is lora_rows above,
 * whose T×r result spreads over ⌈r/4⌉·⌈T/4⌉ workgroups (on a GPU a tiled matmul would get only
 * ⌈T/64⌉ tiles for it); 'matmul' is the tiled matmul, whose staged rows are reused across the
 * tile, which is what counts on CPU adapters, where two cores are busy either way. Measured with
 * `pnpm bench --only lora_fwd_bwd` on SwiftShader and lavapipe: with lora_rows the fused layer fell
 * below the unfused one (0.64× at T=512, d=2048, r=64), with the tiled matmul it does not.
 */
export type LoraThinKernel = 'rows' | 'matmul';

/** The thin-product kernel used on this device unless told otherwise. */
export function loraThinKernel(ctx: GpuContext): LoraThinKernel {
  return isCpuAdapter(ctx) ? 'matmul' : 'rows';
}

/** out (T×r) = x·Lᵀ (transL: L stored r×K, i.e. A) or x·L (L stored K×r, i.e. B). */
async function planLoraThin(
  ctx: GpuContext,
  x: Tensor,
  l: Tensor,
  out: Tensor,
  dims: { M: number; K: number; R: number },
  transL: boolean,
  label: string,
  kernel: LoraThinKernel = loraThinKernel(ctx),
): Promise<Dispatch> {
  if (kernel === 'matmul') return planMatmul(ctx, x, l, out, { transW: transL, label });
  return planLoraRows(ctx, x, l, out, dims, transL, label);
}

export interface LoraForwardBuffers {
  x: Tensor;
  /** T×out, written. */
  y: Tensor;
  /** T×r, written: saved for the backward. */
  h: Tensor;
  /** Default loraThinKernel(ctx); tests run both. */
  thin?: LoraThinKernel;
  /** LoRA dropout on the branch's input (training): h = dropout(x)·Aᵀ. */
  dropout?: LoraDropout;
  /** y += instead of y = (a residual stream the projection adds into). */
  accumulate?: boolean;
  /** h is already computed (one planLoraRowsMulti for the projections reading the same x): plan
   * y alone. */
  hComputed?: boolean;
  /** h = x·Aᵀ formed inside y's dispatch from its staged tiles (planMatmul's lowRank.a2From,
   * matmul_lora_h): one dispatch in all. Not with dropout or hComputed; planMatmul refuses it
   * with an epilogue other than bias, accumulation or RoPE on y, MATVEC_MAX_ROWS rows or fewer,
   * or a rank above LORA_H_MAX_RANK. With f16 tiles, h is formed in f32 from the f16-staged x. */
  hInMatmul?: boolean;
  /** y is stored through the MLP's nonlinearity too (planMatmul's activation epilogue). */
  activation?: MatmulActivation;
  /** Another (unadapted) projection of x in y's dispatch (planMatmul's `second`). */
  second?: { readonly w: Tensor; readonly out: Tensor };
  /** y (and `second`'s output) rotated by RoPE as they are stored (planMatmul's `rope`). */
  rope?: MatmulRope;
  /** y's tile math (planMatmul's `tileMath`): f16 tiles keep the LoRA term in f32. Default 'f32'. */
  tileMath?: TileMath;
}

/**
 * LoRA dropout as PEFT applies it: y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, dropout(x) = keep·x/(1 − p)
 * with keep from a counter-based hash (kernels/dropout.ts), so the backward recomputes the same
 * mask instead of keeping it.
 */
export interface LoraDropout {
  readonly mask: DropoutMask;
  /** T×in f32 scratch (a view into a buffer shared by the layers is fine): dropout(x), and in the
   * backward g·A before it is masked into dx. */
  readonly scratch: Tensor;
}

/**
 * Forward: h = x·Aᵀ, then y = x·W0ᵀ + scale·h·Bᵀ + bias in one tiled kernel. Two dispatches (one
 * with hInMatmul); with dropout, three: xd = dropout(x) first, and h = xd·Aᵀ.
 */
export async function planLoraForward(
  ctx: GpuContext,
  layer: LoraLayer,
  io: LoraForwardBuffers,
  label = 'lora',
): Promise<Dispatch[]> {
  const s = loraShape(layer, io.x, `${label}.forward`);
  expectRows(`${label}.forward`, io.h, s.T, s.r, 'h');
  expectRows(`${label}.forward`, io.y, s.T, s.outF, 'y');
  const pre: Dispatch[] = [];
  let branchInput = io.x;
  if ((io.hComputed || io.hInMatmul) && io.dropout)
    throw new ShapeError(`${label}.forward: LoRA dropout needs its own h dispatch`);
  if (io.hComputed && io.hInMatmul)
    throw new ShapeError(`${label}.forward: h is either computed already or formed in the matmul, not both`);
  if (io.dropout) {
    expectRows(`${label}.forward`, io.dropout.scratch, s.T, s.inF, 'dropout scratch');
    branchInput = io.dropout.scratch;
    pre.push(await planDropout(ctx, io.dropout.mask, io.x, branchInput, { label: `${label}.dropout` }));
  }
  const h =
    io.hComputed || io.hInMatmul
      ? undefined
      : await planLoraThin(ctx, branchInput, layer.a, io.h, { M: s.T, K: s.inF, R: s.r }, true, `${label}.h`, io.thin);
  const y = await planMatmul(ctx, io.x, layer.w0, io.y, {
    transW: true,
    beta: io.accumulate ? 1 : 0,
    bias: layer.bias,
    lowRank: { a2: io.h, b2: layer.b, alpha2: layer.scale, ...(io.hInMatmul ? { a2From: layer.a } : {}) },
    activation: io.activation,
    second: io.second,
    rope: io.rope,
    tileMath: io.tileMath,
    label: `${label}.y`,
  });
  return h ? [...pre, h, y] : [...pre, y];
}

export interface LoraBackwardBuffers {
  x: Tensor;
  /** From the forward. */
  h: Tensor;
  dy: Tensor;
  /** T×r scratch: g = dy·B. */
  g: Tensor;
  /** T×in. Omit when nothing upstream needs it (the lowest adapted layer's input). */
  dx?: Tensor;
  /** r×in and out×r. */
  da: Tensor;
  db: Tensor;
  /** The forward's dropout (same mask and scratch). */
  dropout?: LoraDropout;
}

export interface LoraBackwardOptions {
  /** Add into dx instead of overwriting it (q, k and v share one input). */
  accumulateDx?: boolean;
  /** Add into dA, dB (gradient accumulation over micro-batches). */
  accumulateGrads?: boolean;
  /** Default loraThinKernel(ctx); tests run both. */
  thin?: LoraThinKernel;
  /** g and dB in one dispatch (planLoraGradGdB) at ranks up to `gdBMaxRank`. Default true; false
   * plans them apart (g with `thin`'s kernel). */
  fuse?: boolean;
  /** The largest rank with g and dB in one dispatch when fused. Default loraGdBMaxRank(ctx). */
  gdBMaxRank?: number;
  /** Plan g and dB. Default true; false when the caller computes them with another module's in
   * one planLoraGradGdBPair (io.g and io.db hold them by then). */
  gdB?: boolean;
  /** Plan dA = s·gᵀ·x. Default true; false when the caller computes it with other modules' in one
   * planLoraColsMulti (g stays in io.g for it). */
  dA?: boolean;
  /** dx is ∂L/∂act of the MLP's nonlinearity: store its backward instead (planMatmul's
   * activationBackward; not with dropout, whose dx takes three dispatches). */
  dxActivation?: MatmulActivationBackward;
  /** dx also takes another projection's dy·W (planMatmul's `extra`): two projections that read
   * the same input, one dx dispatch. Not with dropout. */
  dxExtra?: MatmulOptions['extra'];
  /** dx also takes another adapted projection's LoRA term s·g·A (planMatmul's lowRank.second,
   * with dxExtra: matmul_sum_lr): its g a place in io.g's buffer, its A in layer.a's. */
  dxLowRank2?: { readonly g: Tensor; readonly a: Tensor; readonly scale: number };
  /** A third one's (planMatmul's lowRank.third), with dxLowRank2: q, k and v all adapted. */
  dxLowRank3?: { readonly g: Tensor; readonly a: Tensor; readonly scale: number };
  /**
   * 'f16': dy carries a dynamic loss scale, and dx's products stage it in f16 where
   * f16TileMathApplies allows (W0 stored below f32; g·A under dropout keeps f32, its A being f32).
   * Default 'f32'.
   */
  dxTileMath?: TileMath;
}

/**
 * Backward: g = dy·B and dB = s·dyᵀ·h (one dispatch, or two without `fuse` or above
 * `gdBMaxRank`); dA = s·gᵀ·x; dx = dy·W0 + s·g·A (one tiled kernel). W0 and the bias are frozen
 * and get no gradient. Three dispatches (two without dx; one more each with g and dB apart). With dropout,
 * xd = dropout(x) again (the same mask), dA = s·gᵀ·xd, and dx = dy·W0 + s·keep·(g·A)/(1 − p) as
 * separate dispatches (the mask acts on g·A alone, so the fused r-wide term cannot carry it).
 */
export async function planLoraBackward(
  ctx: GpuContext,
  layer: LoraLayer,
  io: LoraBackwardBuffers,
  opts: LoraBackwardOptions = {},
  label = 'lora',
): Promise<Dispatch[]> {
  const op = `${label}.backward`;
  const s = loraShape(layer, io.x, op);
  expectRows(op, io.h, s.T, s.r, 'h');
  expectRows(op, io.dy, s.T, s.outF, 'dy');
  expectRows(op, io.g, s.T, s.r, 'g');
  expectRows(op, io.da, s.r, s.inF, 'dA');
  expectRows(op, io.db, s.outF, s.r, 'dB');
  if (io.dx) expectRows(op, io.dx, s.T, s.inF, 'dx');
  const beta = opts.accumulateGrads ? 1 : 0;
  const dropout = io.dropout;
  if (dropout) expectRows(op, dropout.scratch, s.T, s.inF, 'dropout scratch');
  // dA reads the branch's input: x, or with dropout xd = dropout(x) recomputed into the scratch.
  const xd = dropout?.scratch;
  const plan =
    opts.gdB === false
      ? []
      : (opts.fuse ?? true) && s.r <= (opts.gdBMaxRank ?? loraGdBMaxRank(ctx))
        ? [
            await planLoraGradGdB(
              ctx,
              { dy: io.dy, b: layer.b, h: io.h, g: io.g, db: io.db },
              { T: s.T, N: s.outF, R: s.r },
              layer.scale,
              beta,
              `${label}.g_dB`,
            ),
          ]
        : [
            await planLoraThin(
              ctx,
              io.dy,
              layer.b,
              io.g,
              { M: s.T, K: s.outF, R: s.r },
              false,
              `${label}.g`,
              opts.thin,
            ),
            await planLoraWeightGrad(
              ctx,
              io.dy,
              io.h,
              io.db,
              { T: s.T, N: s.outF, R: s.r },
              true,
              layer.scale,
              beta,
              `${label}.dB`,
            ),
          ];
  if (dropout && xd) plan.push(await planDropout(ctx, dropout.mask, io.x, xd, { label: `${label}.dropout` }));
  if (opts.dA === false && dropout) throw new ShapeError(`${op}: LoRA dropout needs its own dA dispatch`);
  if (opts.dA !== false) {
    plan.push(
      await planLoraWeightGrad(
        ctx,
        xd ?? io.x,
        io.g,
        io.da,
        { T: s.T, N: s.inF, R: s.r },
        false,
        layer.scale,
        beta,
        `${label}.dA`,
      ),
    );
  }
  if ((opts.dxActivation || opts.dxExtra || opts.dxLowRank2 || opts.dxLowRank3) && dropout)
    throw new ShapeError(`${op}: LoRA dropout's dx takes no activation epilogue or second product`);
  // f16 tiles for a dx product where asked for and they apply (dxTileMath).
  const tiles = (o: MatmulOptions): MatmulOptions => lossScaledTiles(ctx, layer.w0, o, opts.dxTileMath);
  if (io.dx && dropout && xd) {
    plan.push(
      await planMatmul(
        ctx,
        io.dy,
        layer.w0,
        io.dx,
        tiles({ transW: false, beta: opts.accumulateDx ? 1 : 0, label: `${label}.dx` }),
      ),
      // The scratch is free again once dA has read xd: it takes g·A, then its masked s-multiple joins dx.
      await planMatmul(ctx, io.g, layer.a, xd, { transW: false, label: `${label}.gA` }),
      await planDropout(ctx, dropout.mask, xd, io.dx, { alpha: layer.scale, beta: 1, label: `${label}.dx_dropout` }),
    );
  } else if (io.dx) {
    plan.push(
      await planMatmul(
        ctx,
        io.dy,
        layer.w0,
        io.dx,
        tiles({
          transW: false,
          beta: opts.accumulateDx ? 1 : 0,
          lowRank: {
            a2: io.g,
            b2: layer.a,
            alpha2: layer.scale,
            ...(opts.dxLowRank2
              ? { second: { a2: opts.dxLowRank2.g, b2: opts.dxLowRank2.a, alpha2: opts.dxLowRank2.scale } }
              : {}),
            ...(opts.dxLowRank3
              ? { third: { a2: opts.dxLowRank3.g, b2: opts.dxLowRank3.a, alpha2: opts.dxLowRank3.scale } }
              : {}),
          },
          activationBackward: opts.dxActivation,
          extra: opts.dxExtra,
          label: `${label}.dx`,
        }),
      ),
    );
  }
  return plan;
}

/**
 * FLOPs of one forward and one backward (dx included), two per multiply-add: the forward's dense
 * x·W0ᵀ (2·T·in·out) plus the thin h = x·Aᵀ and h·Bᵀ (2·T·r·(in + out)); the backward's dense
 * dy·W0 plus the thin g = dy·B, g·A, dB = dyᵀ·h and dA = gᵀ·x (4·T·r·(in + out)).
 */
export function loraFlops(s: LoraShape): { forward: number; backward: number } {
  const dense = 2 * s.T * s.inF * s.outF;
  const thin = 2 * s.T * s.r * (s.inF + s.outF);
  return { forward: dense + thin, backward: dense + 2 * thin };
}
