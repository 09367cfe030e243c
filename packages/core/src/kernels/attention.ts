import attentionSource from '../../../../shaders/attention.wgsl?raw';
import ropeMath from '../../../../shaders/rope_math.wgsl?raw';
import tileF16 from '../../../../shaders/tile_f16.wgsl?raw';
import tileF32 from '../../../../shaders/tile_f32.wgsl?raw';
import type { GpuContext } from '../context.js';
import { LimitExceededError, ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type Kernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape, type Shape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { composeShader, type ShaderPart } from './compose.js';
import { isCpuAdapter, type TileMath } from './matmul.js';

/**
 * Where the rows of q, k or v live in their buffer (all in f32 elements): element d of head h of
 * row t of batch b is at `offset + b·batchStride + t·rowStride + h·hd + d`.
 */
export interface AttentionLayout {
  readonly rowStride: number;
  readonly offset: number;
  readonly batchStride: number;
}

/**
 * Shapes of one attention call. Query row t of batch b is at absolute position pos0 + t; keys
 * 0..Tk-1 at positions 0..Tk-1; key j is visible to query i iff j ≤ pos0 + i.
 * Prefill: Tq = Tk = T, pos0 = 0. Decode with a KV cache: pos0 = past length, Tk = pos0 + Tq.
 */
export interface AttentionDims {
  readonly B: number;
  readonly Tq: number;
  readonly Tk: number;
  readonly pos0: number;
  /** Query heads. */
  readonly nH: number;
  /** Key/value heads; nH % nKV == 0 and query head h reads kv head h / (nH / nKV). */
  readonly nKV: number;
  /** Head size, 1..256. */
  readonly hd: number;
  /** Multiplies q·k; default 1/√hd. */
  readonly scale?: number;
  /** Default contiguous: rowStride nH·hd, offset 0, batchStride Tq·rowStride. */
  readonly q?: Partial<AttentionLayout>;
  /** Default contiguous: rowStride nKV·hd, offset 0, batchStride Tk·rowStride. */
  readonly k?: Partial<AttentionLayout>;
  readonly v?: Partial<AttentionLayout>;
}

/** The dims with every default filled in. */
export interface ResolvedAttentionDims {
  readonly B: number;
  readonly Tq: number;
  readonly Tk: number;
  readonly pos0: number;
  readonly nH: number;
  readonly nKV: number;
  readonly hd: number;
  readonly scale: number;
  readonly q: AttentionLayout;
  readonly k: AttentionLayout;
  readonly v: AttentionLayout;
}

/** Largest head size the kernels take. */
export const ATTENTION_MAX_HEAD_DIM = 256;

/** Output columns (vec4) each invocation keeps in registers; must equal VPT in the WGSL. */
const VPT = 4;
/** Most streamed rows one invocation takes per pass of its dot products; KPT_MAX in the WGSL. */
const KPT_MAX = 4;
/** Workgroup size of attention_bwd_delta; DELTA_WG in the WGSL. */
const DELTA_WG = 64;
/** Invocations per workgroup of the rows kernels (one per row). */
const ROWS_WG = 64;

/** Layout of q, k and v inside one fused projection output [B·T, (nH + 2·nKV)·hd] (GPT-2's
 * c_attn writes [T, 3·d]): q at column 0, k at nH·hd, v at (nH + nKV)·hd. */
export function fusedQkvLayout(d: { T: number; nH: number; nKV: number; hd: number }): {
  q: AttentionLayout;
  k: AttentionLayout;
  v: AttentionLayout;
} {
  const rowStride = (d.nH + 2 * d.nKV) * d.hd;
  const batchStride = d.T * rowStride;
  return {
    q: { rowStride, offset: 0, batchStride },
    k: { rowStride, offset: d.nH * d.hd, batchStride },
    v: { rowStride, offset: (d.nH + d.nKV) * d.hd, batchStride },
  };
}

/** Layout of a KV cache [B, maxT, nKV·hd] (one buffer for k, another for v). */
export function kvCacheLayout(d: { maxT: number; nKV: number; hd: number }): AttentionLayout {
  const rowStride = d.nKV * d.hd;
  return { rowStride, offset: 0, batchStride: d.maxT * rowStride };
}

function positiveInt(op: string, name: string, value: number, min = 1): void {
  if (!Number.isSafeInteger(value) || value < min) {
    throw new ShapeError(`${op}: ${name} = ${String(value)} must be an integer ≥ ${min}`);
  }
}

/** Checks the dims on their own and fills in the defaults. */
export function resolveAttentionDims(dims: AttentionDims, op = 'attention'): ResolvedAttentionDims {
  for (const name of ['B', 'Tq', 'Tk', 'nH', 'nKV', 'hd'] as const) positiveInt(op, name, dims[name]);
  positiveInt(op, 'pos0', dims.pos0, 0);
  const { B, Tq, Tk, pos0, nH, nKV, hd } = dims;
  if (hd > ATTENTION_MAX_HEAD_DIM) {
    throw new ShapeError(`${op}: head size hd = ${hd} is larger than ${ATTENTION_MAX_HEAD_DIM}`);
  }
  if (nH % nKV !== 0) {
    throw new ShapeError(`${op}: nH = ${nH} query heads is not a multiple of nKV = ${nKV} key/value heads`);
  }
  const scale = dims.scale ?? 1 / Math.sqrt(hd);
  if (!Number.isFinite(scale)) throw new ShapeError(`${op}: scale ${scale} is not finite`);
  const layout = (name: 'q' | 'k' | 'v', heads: number, rows: number): AttentionLayout => {
    const given = dims[name] ?? {};
    const rowStride = given.rowStride ?? heads * hd;
    const l = { rowStride, offset: given.offset ?? 0, batchStride: given.batchStride ?? rows * rowStride };
    positiveInt(op, `${name}.rowStride`, l.rowStride);
    positiveInt(op, `${name}.offset`, l.offset, 0);
    positiveInt(op, `${name}.batchStride`, l.batchStride, 0);
    if (l.offset % l.rowStride > l.rowStride - heads * hd) {
      throw new ShapeError(
        `${op}: ${name} rows of ${heads} heads × ${hd} = ${heads * hd} columns starting at offset ${l.offset} ` +
          `do not fit in a row stride of ${l.rowStride}`,
      );
    }
    return l;
  };
  return {
    B,
    Tq,
    Tk,
    pos0,
    nH,
    nKV,
    hd,
    scale,
    q: layout('q', nH, Tq),
    k: layout('k', nKV, Tk),
    v: layout('v', nKV, Tk),
  };
}

/** Shapes of the outputs and of the saved/scratch buffers for these dims. */
export function attentionShapes(dims: AttentionDims): {
  /** Also the shape of dout and dq. */
  o: Shape;
  /** Saved by the forward for the backward. */
  lse: Shape;
  /** Backward scratch: rowsum(dout ∘ o). */
  delta: Shape;
  /** Also the shape of dv. */
  dk: Shape;
} {
  const d = resolveAttentionDims(dims);
  return {
    o: [d.B * d.Tq, d.nH * d.hd],
    lse: [d.B, d.nH, d.Tq],
    delta: [d.B, d.nH, d.Tq],
    dk: [d.B * d.Tk, d.nKV * d.hd],
  };
}

/** Bytes of the scratch the backward needs beyond its inputs and outputs (delta). */
export function attentionScratchBytes(dims: AttentionDims): { lse: number; delta: number } {
  const d = resolveAttentionDims(dims);
  const rows = d.B * d.nH * d.Tq;
  return { lse: rows * 4, delta: rows * 4 };
}

/**
 * Which set of kernels runs (see shaders/attention.wgsl): 'tiled' stages blocks of rows in
 * workgroup memory (real GPUs); 'rows' gives each invocation one row and reads the others straight
 * from the buffers, with no workgroup memory and no barrier (CPU-backed adapters, where starting a
 * workgroup that has either costs about 10 µs per four invocations on SwiftShader, and workgroup
 * memory is plain RAM). Both give the same results up to f32 rounding.
 */
export type AttentionVariant = 'tiled' | 'rows';

/** The variant the planners use on this device unless told otherwise. */
export function attentionVariant(ctx: GpuContext): AttentionVariant {
  return isCpuAdapter(ctx) ? 'rows' : 'tiled';
}

/** Tile sizes of the tiled kernels for one device and head size. Each kernel gets its own. */
export interface AttentionTiles {
  /** vec4s per staged row: ⌈hd / 4⌉. */
  readonly hd4: number;
  /** Invocations per tile row: ⌈hd4 / 4⌉. */
  readonly td: number;
  readonly fwd: AttentionTile;
  readonly dq: AttentionTile;
  readonly dkv: AttentionTile;
  /** attention_bwd: dq and dkv's workgroups in one dispatch, with dkv's storage. */
  readonly bwd: AttentionTile;
}

export interface AttentionTile {
  /** Rows a workgroup owns: query rows (fwd, dq), keys (dkv). */
  readonly own: number;
  /** Rows streamed past them per block: keys (fwd, dq), query rows (dkv). */
  readonly stream: number;
  /** Streamed rows an invocation takes per pass of its dot products. */
  readonly kpt: number;
}

type TiledKernel = 'fwd' | 'dq' | 'dkv' | 'bwd';

/** Workgroup storage in bytes the WGSL declares for each entry point; staged rows of f16 take
 * half as much. attention_bwd uses every array attention_bwd_dkv does (and dq's are among them). */
function workgroupBytes(kernel: TiledKernel, hd4: number, own: number, stream: number, tiles: TileMath): number {
  const row = (tiles === 'f16' ? 8 : 16) * hd4;
  if (kernel === 'fwd') return row * (own + 2 * stream) + 4 * own * stream;
  if (kernel === 'dq') return row * (2 * own + 2 * stream) + 4 * own * stream;
  return row * (2 * own + 2 * stream) + 8 * own * stream + 8 * stream;
}

// Preferred (rows owned by the workgroup, rows streamed) pairs, largest first. The 64-row tiles
// only fit small heads, where one invocation owns a whole row.
const TILE_CANDIDATES: readonly (readonly [number, number])[] = [
  [64, 64],
  [64, 32],
  [32, 32],
  [32, 16],
  [16, 16],
  [16, 8],
  [8, 8],
  [8, 4],
  [4, 4],
  [4, 2],
  [2, 2],
  [2, 1],
  [1, 1],
];

/**
 * Workgroup storage the tiles aim for even when the device offers more: 16 KiB for heads up to
 * 64 and 16 KiB per 64 columns above, so every head size gets tiles of about the same number of
 * rows where the device allows. 16 KiB is the WebGPU default every adapter has and leaves room
 * for several resident workgroups per compute unit on real GPUs. CPU adapters run the rows kernels
 * and build the tiled ones only when a test asks for them; they get 8 KiB, because SwiftShader's
 * pipeline compilation time grows about linearly with the declared workgroup memory (a trivial
 * shader: ~1 s at 4 KiB, ~5 s at 16 KiB of CPU time).
 */
export function attentionTileBudget(ctx: GpuContext, hd4: number): number {
  const want = isCpuAdapter(ctx) ? 8 * 1024 : Math.max(16 * 1024, 1024 * hd4);
  return Math.min(ctx.limits.maxComputeWorkgroupStorageSize, want);
}

/**
 * Chooses the tiles of the tiled kernels from the device's limits: the staged rows of a block
 * must fit in attentionTileBudget, and (rows owned)·td invocations in one workgroup. The head
 * size is a pipeline constant, so each head size has its own pipelines (a model has one).
 */
export function attentionTiles(
  ctx: GpuContext,
  hd: number,
  tileMath: TileMath = 'f32',
  gradTileMath: TileMath = 'f32',
): AttentionTiles {
  const hd4 = Math.ceil(hd / 4);
  const td = Math.ceil(hd4 / VPT);
  const storage = attentionTileBudget(ctx, hd4);
  const threads = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup, ctx.limits.maxComputeWorkgroupSizeX);
  const pick = (kernel: TiledKernel): AttentionTile => {
    for (const [own, stream] of TILE_CANDIDATES) {
      const kpt = Math.max(1, Math.min(KPT_MAX, Math.floor(stream / td)));
      // The forward's rows take tileMath, the backward's gradTileMath (AttentionBackwardArgs).
      const rows = kernel === 'fwd' ? tileMath : gradTileMath;
      if (own * td <= threads && workgroupBytes(kernel, hd4, own, stream, rows) <= storage) return { own, stream, kpt };
    }
    throw new LimitExceededError(
      'maxComputeWorkgroupStorageSize',
      workgroupBytes(kernel, hd4, 1, 1, kernel === 'fwd' ? tileMath : gradTileMath),
      storage,
      `attention_${kernel} with head size ${hd}`,
    );
  };
  return { hd4, td, fwd: pick('fwd'), dq: pick('dq'), dkv: pick('dkv'), bwd: pick('bwd') };
}

/** Invocations per workgroup of the rows kernels on this device. */
function rowsWorkgroup(ctx: GpuContext): number {
  return Math.min(ROWS_WG, ctx.limits.maxComputeInvocationsPerWorkgroup, ctx.limits.maxComputeWorkgroupSizeX);
}

type AttentionBinding = 'uniform' | 'read' | 'write';

// The staged rows' type and products (tile_f32.wgsl, or tile_f16.wgsl with f16 enabled), cos_sin
// (rope_math.wgsl, RoPE's backward inside dq and dk), then the kernels. Two builds, each composed
// once: the forward's f16 build, and the tiled backward's under a loss scale (gradTileMath).
const ROPE_MATH: ShaderPart = { file: 'shaders/rope_math.wgsl', source: ropeMath };
const ATTENTION: ShaderPart = { file: 'shaders/attention.wgsl', source: attentionSource };
const SOURCES: Record<TileMath, ShaderPart> = {
  f32: composeShader([], [{ file: 'shaders/tile_f32.wgsl', source: tileF32 }, ROPE_MATH, ATTENTION]),
  f16: composeShader(['f16'], [{ file: 'shaders/tile_f16.wgsl', source: tileF16 }, ROPE_MATH, ATTENTION]),
};

function spec(entryPoint: string, bindings: readonly AttentionBinding[], tiles: TileMath = 'f32'): KernelSpec {
  return { ...SOURCES[tiles], entryPoint, bindings };
}

/** RoPE's inverse frequencies in the uniform block: at most 128 (head size 256). */
const ROPE_MAX_FREQUENCIES = 128;

/**
 * The uniform block of the attention kernels for these dims. A planned dispatch's shapes can be
 * moved along with Dispatch.setUniforms(attentionUniforms(...)) (generation advances pos0 and Tk
 * each token), as long as the buffers bound at planning time still cover them. Not for the
 * one-dispatch backward (attention_bwd), whose block also holds dq's, dk's and dv's offsets and
 * RoPE's frequencies, which this one leaves at 0.
 */
export function attentionUniforms(dims: AttentionDims): ArrayBuffer {
  return uniforms(resolveAttentionDims(dims));
}

/** Bytes of every attention dispatch's uniform block (memory estimates count them). */
export function attentionUniformBytes(): number {
  return attentionUniforms({ B: 1, Tq: 1, Tk: 1, pos0: 0, nH: 1, nKV: 1, hd: 8 }).byteLength;
}

/** Where attention_bwd writes dq, dk and dv in its grads operand (elements). */
interface GradOffsets {
  readonly dq: number;
  readonly dk: number;
  readonly dv: number;
}

function uniforms(d: ResolvedAttentionDims, rope?: AttentionRope, grads?: GradOffsets): ArrayBuffer {
  const freq = Array.from({ length: ROPE_MAX_FREQUENCIES }, (_, i): ['f32', number] => ['f32', rope?.invFreq[i] ?? 0]);
  return packUniforms([
    ['u32', d.B],
    ['u32', d.Tq],
    ['u32', d.Tk],
    ['u32', d.pos0],
    ['u32', d.nH],
    ['u32', d.nKV],
    ['u32', d.hd],
    ['u32', Math.ceil(d.hd / 4)],
    ['u32', d.nH / d.nKV],
    ['u32', d.q.rowStride],
    ['u32', d.q.offset],
    ['u32', d.q.batchStride],
    ['u32', d.k.rowStride],
    ['u32', d.k.offset],
    ['u32', d.k.batchStride],
    ['u32', d.v.rowStride],
    ['u32', d.v.offset],
    ['u32', d.v.batchStride],
    ['f32', d.scale],
    ['f32', rope?.scaling ?? 0],
    ['u32', grads?.dq ?? 0],
    ['u32', grads?.dk ?? 0],
    ['u32', grads?.dv ?? 0],
    ['u32', 0],
    ...freq,
  ]);
}

function expectF32(op: string, name: string, t: Tensor): void {
  if (t.dtype !== 'f32') throw new ShapeError(`${op}: ${name} ${t.label} is ${t.dtype}, must be f32`);
}

/** Checks that a strided operand's buffer holds every element the kernels address. */
function expectCovers(
  op: string,
  name: string,
  t: Tensor,
  l: AttentionLayout,
  d: ResolvedAttentionDims,
  rows: number,
  heads: number,
): void {
  expectF32(op, name, t);
  const last = l.offset + (d.B - 1) * l.batchStride + (rows - 1) * l.rowStride + heads * d.hd - 1;
  if (last >= t.size) {
    throw new ShapeError(
      `${op}: ${name} ${t.label} ${formatShape(t.shape)} holds ${t.size} elements, but B = ${d.B}, ` +
        `${rows} rows of ${heads} heads × hd ${d.hd} at offset ${l.offset}, row stride ${l.rowStride}, ` +
        `batch stride ${l.batchStride} reach element ${last}`,
    );
  }
  if (last >= 2 ** 32) throw new ShapeError(`${op}: ${name} addresses element ${last}, beyond u32 indexing`);
}

/** Checks a contiguous operand's element count (its shape may be 2-D or more). */
function expectSize(op: string, name: string, t: Tensor, shape: Shape, what: string): void {
  expectF32(op, name, t);
  const want = shape.reduce((a, b) => a * b, 1);
  if (t.size !== want) {
    throw new ShapeError(
      `${op}: ${name} ${t.label} has shape ${formatShape(t.shape)}, expected ${formatShape(shape)} (${what})`,
    );
  }
}

export interface AttentionForwardArgs {
  /** Query rows B·Tq (strided as dims.q says). */
  q: Tensor;
  /** Key rows (strided as dims.k says); may be the same tensor as q and v. */
  k: Tensor;
  v: Tensor;
  /** [B·Tq, nH·hd], written. */
  o: Tensor;
  /** [B, nH, Tq], written: log Σ exp of the scaled scores, saved for the backward. */
  lse: Tensor;
  dims: AttentionDims;
  /** Which kernels to run; default attentionVariant(ctx). Tests and benchmarks set it. */
  variant?: AttentionVariant;
  /**
   * The tiled forward's staged rows: 'f32' (the default), or 'f16' (needs shader-f16): q, k and
   * v round to f16 as they are staged, which halves the tiles' workgroup memory, so the blocks
   * hold twice the rows; the products are formed in f32, and lse is the rounded scores'. The rows
   * kernels stage nothing and stay f32. In the backward's arguments: the tile math the forward
   * ran with ('f16' only where it took the f16 build): 'f16' has the backward kernels (either
   * variant, any adapter; f32 builds unless gradTileMath asks for f16) read q, k and v rounded to
   * f16 as the forward staged them, so that they recompute the forward's scores and differentiate
   * what it computed.
   */
  tileMath?: TileMath;
}

function checkCommon(op: string, io: { q: Tensor; k: Tensor; v: Tensor; o: Tensor; lse: Tensor }, dims: AttentionDims) {
  const d = resolveAttentionDims(dims, op);
  expectCovers(op, 'q', io.q, d.q, d, d.Tq, d.nH);
  expectCovers(op, 'k', io.k, d.k, d, d.Tk, d.nKV);
  expectCovers(op, 'v', io.v, d.v, d, d.Tk, d.nKV);
  const s = attentionShapes(d);
  expectSize(op, 'o', io.o, s.o, 'B·Tq × nH·hd');
  expectSize(op, 'lse', io.lse, s.lse, 'B × nH × Tq');
  return d;
}

/**
 * Causal attention forward: o and lse from q, k, v. One dispatch, a workgroup per
 * (query block, head, batch).
 */
export async function planAttentionForward(
  ctx: GpuContext,
  io: AttentionForwardArgs,
  label = 'attention',
): Promise<Dispatch[]> {
  const op = `${label}.forward`;
  const d = checkCommon(op, io, io.dims);
  const bindings = ['uniform', 'read', 'read', 'read', 'write', 'write'] as const;
  const name = `${op} B${d.B} Tq${d.Tq} Tk${d.Tk} h${d.nH}/${d.nKV} hd${d.hd}`;
  const tileMath = io.tileMath ?? 'f32';
  if (tileMath === 'f16' && !ctx.features.shaderF16) {
    throw new ShapeError(`${op}: f16 tile math needs an adapter with shader-f16, and this one has none`);
  }
  const resources = [io.q, io.k, io.v, io.o, io.lse];
  // The workgroup count depends on Tq, nH and B only, so attentionUniforms can move Tk and pos0.
  if ((io.variant ?? attentionVariant(ctx)) === 'rows') {
    const wg = rowsWorkgroup(ctx);
    const kernel = await getKernel(ctx, spec('attention_fwd_rows', bindings), { HD: d.hd, WG: wg });
    return [
      bindKernel(ctx, kernel, {
        label: name,
        resources,
        workgroups: [Math.ceil(d.Tq / wg), d.nH, d.B],
        uniforms: uniforms(d),
      }),
    ];
  }
  const tiles = attentionTiles(ctx, d.hd, tileMath);
  const kernel = await getKernel(ctx, spec('attention_fwd', bindings, tileMath), {
    // The f16 build reads q, k and v rounded to f16 to nearest even (as_staged), so that its
    // conversions to f16 are exact on every device and its backward, which reads them rounded
    // the same way, recomputes exactly the scores whose lse it saved.
    ...(tileMath === 'f16' ? { ROUND_F16: true } : {}),
    HD: d.hd,
    TD: tiles.td,
    OWN: tiles.fwd.own,
    STR: tiles.fwd.stream,
    KPT: tiles.fwd.kpt,
  });
  return [
    bindKernel(ctx, kernel, {
      label: name,
      resources,
      workgroups: [Math.ceil(d.Tq / tiles.fwd.own), d.nH, d.B],
      uniforms: uniforms(d),
    }),
  ];
}

/**
 * RoPE as the attention backward's dq and dk kernels undo it (query row i at position pos0 + i, key
 * j at j): they store the gradients of q and k before their rotation, so no RoPE backward
 * dispatch follows. The model's inverse frequencies [hd/2] and attention scaling.
 */
export interface AttentionRope {
  readonly invFreq: Float32Array;
  readonly scaling: number;
}

/** Whether the attention backward can take RoPE's backward for head size hd: whole vec4s in each
 * half of a head. */
export function attentionTakesRope(hd: number): boolean {
  return hd % 8 === 0 && hd / 2 <= ROPE_MAX_FREQUENCIES;
}

export interface AttentionBackwardArgs extends AttentionForwardArgs {
  /** ∂L/∂o, [B·Tq, nH·hd]. */
  do: Tensor;
  /** [B·Tq, nH·hd], written. */
  dq: Tensor;
  /** [B·Tk, nKV·hd] (contiguous whatever k's layout), written. */
  dk: Tensor;
  /** [B·Tk, nKV·hd], written. */
  dv: Tensor;
  /**
   * [B, nH, Tq] scratch: D = rowsum(do ∘ o), written then read. Not needed (and not written) where
   * the backward is one dispatch: the tiled kernels, fused, with dq, dk and dv places of one buffer.
   */
  delta?: Tensor;
  /** q and k were rotated by RoPE: dq and dk come out as the gradients before the rotation. */
  rope?: AttentionRope;
  /**
   * The tiled backward kernels' staged rows: 'f32' (the default), or 'f16' where `do` carries a
   * dynamic loss scale (core's loss_scale.ts) and the forward staged q, k and v in f16 (tileMath
   * 'f16'; needs shader-f16): q, k and v stage exactly as the forward rounded them, do rounds to
   * f16 (the scale keeps its small values inside f16's range), the products are formed in f32,
   * and the tiles hold twice the rows. Where RoPE's backward runs inside, dq and dk pass through
   * f16 once as the rotation's partner columns are exchanged. The rows kernels stage nothing and
   * are the same either way.
   */
  gradTileMath?: TileMath;
}

/**
 * Whether the backward of these tensors is one dispatch (attention_bwd): the tiled kernels, fused,
 * dq, dk and dv disjoint places of one buffer whose range holding them can be bound. Otherwise two
 * (three with `fuse: false`).
 */
export function attentionBackwardIsOne(
  ctx: GpuContext,
  io: { dq: Tensor; dk: Tensor; dv: Tensor; variant?: AttentionVariant },
  fuse = true,
): boolean {
  const { dq, dk, dv } = io;
  if (!fuse || (io.variant ?? attentionVariant(ctx)) !== 'tiled') return false;
  if (dk.buffer !== dq.buffer || dv.buffer !== dq.buffer) return false;
  const span = gradSpan(io);
  return span.size <= ctx.limits.maxStorageBufferBindingSize;
}

/** The byte range holding dq, dk and dv (places of one buffer), and their element offsets in it. */
function gradSpan(io: { dq: Tensor; dk: Tensor; dv: Tensor }): {
  buffer: GPUBuffer;
  offset: number;
  size: number;
  at: GradOffsets;
} {
  const places = [io.dq, io.dk, io.dv];
  const start = Math.min(...places.map((t) => t.byteOffset));
  const end = Math.max(...places.map((t) => t.byteOffset + t.bindingSize));
  const at = (t: Tensor) => (t.byteOffset - start) / 4;
  return {
    buffer: io.dq.buffer,
    offset: start,
    size: end - start,
    at: { dq: at(io.dq), dk: at(io.dk), dv: at(io.dv) },
  };
}

/**
 * Causal attention backward: dq, dk, dv (all written, none accumulated) from q, k, v, the
 * forward's o and lse, and do. Fused (the default), where dq, dk and dv are places of one buffer
 * on the tiled kernels: one dispatch (attention_bwd), whose workgroups each take a key block of a kv
 * head (dk, dv) or a query block of a head (dq) and form the delta they need from o themselves.
 * Otherwise two: dq per (query block, head, batch), which also computes delta = rowsum(do ∘ o)
 * for its rows and writes it; then dk and dv per (key block, kv head, batch), summed over the kv
 * head's query heads. `fuse: false` computes delta in a dispatch of its own first (three).
 */
export async function planAttentionBackward(
  ctx: GpuContext,
  io: AttentionBackwardArgs,
  label = 'attention',
  opts: { fuse?: boolean } = {},
): Promise<Dispatch[]> {
  const fuse = opts.fuse ?? true;
  const op = `${label}.backward`;
  const rope = io.rope;
  const hd = io.dims.hd;
  if (rope && (!attentionTakesRope(hd) || rope.invFreq.length !== hd / 2)) {
    throw new ShapeError(
      `${op}: RoPE inside the attention backward needs a head size that is a multiple of 8 (up to ${2 * ROPE_MAX_FREQUENCIES}) and hd/2 inverse frequencies; got hd ${hd} and ${rope.invFreq.length}`,
    );
  }
  const d = checkCommon(op, io, io.dims);
  const s = attentionShapes(d);
  expectSize(op, 'do', io.do, s.o, 'B·Tq × nH·hd');
  expectSize(op, 'dq', io.dq, s.o, 'B·Tq × nH·hd');
  expectSize(op, 'dk', io.dk, s.dk, 'B·Tk × nKV·hd, contiguous');
  expectSize(op, 'dv', io.dv, s.dk, 'B·Tk × nKV·hd, contiguous');
  const one = attentionBackwardIsOne(ctx, io, fuse);
  if (one && overlap([io.dq, io.dk, io.dv])) {
    throw new ShapeError(`${op}: dq ${io.dq.label}, dk ${io.dk.label} and dv ${io.dv.label} overlap in their buffer`);
  }
  const delta = io.delta;
  if (!one) {
    if (!delta) throw new ShapeError(`${op}: the backward in two dispatches needs a delta scratch [B, nH, Tq]`);
    expectSize(op, 'delta', delta, s.delta, 'B × nH × Tq scratch');
  }
  // attention_bwd_dkv binds 8 storage buffers, the WebGPU default; some compatibility adapters
  // could offer fewer.
  const storageBuffers = ctx.limits.maxStorageBuffersPerShaderStage;
  const needed = one ? 7 : 8;
  if (storageBuffers < needed)
    throw new LimitExceededError('maxStorageBuffersPerShaderStage', needed, storageBuffers, op);
  const ROPE = rope !== undefined;
  // The forward staged q, k and v in f16: read them as it did (AttentionForwardArgs.tileMath).
  const ROUND_F16 = (io.tileMath ?? 'f32') === 'f16';
  const grads = io.gradTileMath ?? 'f32';
  if (grads === 'f16' && !(ctx.features.shaderF16 && ROUND_F16))
    throw new ShapeError(
      `${op}: f16 tiles in the backward need shader-f16 and a forward that staged q, k and v in f16 (tileMath 'f16')`,
    );
  const name = `B${d.B} Tq${d.Tq} Tk${d.Tk} h${d.nH}/${d.nKV} hd${d.hd}`;
  const read7 = ['uniform', 'read', 'read', 'read', 'read', 'read', 'read'] as const;
  if (one) {
    const tiles = attentionTiles(ctx, d.hd, 'f32', grads);
    const span = gradSpan(io);
    const kernel = await getKernel(ctx, spec('attention_bwd', [...read7, 'write'], grads), {
      DELTA_FROM_O: true,
      ROPE,
      ROUND_F16,
      HD: d.hd,
      TD: tiles.td,
      OWN: tiles.bwd.own,
      STR: tiles.bwd.stream,
      KPT: tiles.bwd.kpt,
    });
    const own = tiles.bwd.own;
    return [
      bindKernel(ctx, kernel, {
        label: `${op} ${name}`,
        resources: [
          io.q,
          io.k,
          io.v,
          io.do,
          io.lse,
          io.o,
          { buffer: span.buffer, offset: span.offset, size: span.size },
        ],
        // Key blocks of the kv heads, then query blocks of the query heads, along y.
        workgroups: [Math.ceil(Math.max(d.Tk, d.Tq) / own), d.nKV + d.nH, d.B],
        uniforms: uniforms(d, rope, span.at),
      }),
    ];
  }
  const scratch = delta as Tensor;
  const u = uniforms(d, rope);
  const common = [io.q, io.k, io.v, io.do, io.lse, scratch];
  const deltaK = fuse ? undefined : getKernel(ctx, spec('attention_bwd_delta', ['uniform', 'read', 'read', 'write']));
  // dq: binding 6 is o when it computes delta itself, and binding 8 takes delta (a placeholder
  // otherwise).
  const dqBindings = [...read7, 'write', 'write'] as const;
  const dqResources = [
    io.q,
    io.k,
    io.v,
    io.do,
    io.lse,
    fuse ? io.o : scratch,
    io.dq,
    fuse ? scratch : ctx.placeholder('write'),
  ];
  let dqK: Promise<Kernel>;
  let dkvK: Promise<Kernel>;
  let dqGroups: number;
  let dkvGroups: number;
  if ((io.variant ?? attentionVariant(ctx)) === 'rows') {
    const wg = rowsWorkgroup(ctx);
    dqK = getKernel(ctx, spec('attention_bwd_dq_rows', dqBindings), {
      HD: d.hd,
      WG: wg,
      DELTA_FROM_O: fuse,
      ROPE,
      ROUND_F16,
    });
    dkvK = getKernel(ctx, spec('attention_bwd_dkv_rows', [...read7, 'write', 'write']), {
      HD: d.hd,
      WG: wg,
      ROPE,
      ROUND_F16,
    });
    dqGroups = Math.ceil(d.Tq / wg);
    dkvGroups = Math.ceil(d.Tk / wg);
  } else {
    const tiles = attentionTiles(ctx, d.hd, 'f32', grads);
    dqK = getKernel(ctx, spec('attention_bwd_dq', dqBindings, grads), {
      DELTA_FROM_O: fuse,
      ROPE,
      ROUND_F16,
      HD: d.hd,
      TD: tiles.td,
      OWN: tiles.dq.own,
      STR: tiles.dq.stream,
      KPT: tiles.dq.kpt,
    });
    dkvK = getKernel(ctx, spec('attention_bwd_dkv', [...read7, 'write', 'write'], grads), {
      ROPE,
      ROUND_F16,
      HD: d.hd,
      TD: tiles.td,
      OWN: tiles.dkv.own,
      STR: tiles.dkv.stream,
      KPT: tiles.dkv.kpt,
    });
    dqGroups = Math.ceil(d.Tq / tiles.dq.own);
    dkvGroups = Math.ceil(d.Tk / tiles.dkv.own);
  }
  const [deltaKernel, dq, dkv] = await Promise.all([deltaK, dqK, dkvK]);
  const plan = deltaKernel
    ? [
        bindKernel(ctx, deltaKernel, {
          label: `${op}.delta ${name}`,
          resources: [io.o, io.do, scratch],
          workgroups: [Math.ceil(d.Tq / DELTA_WG), d.nH, d.B],
          uniforms: u,
        }),
      ]
    : [];
  plan.push(
    bindKernel(ctx, dq, {
      label: `${op}.dq ${name}`,
      resources: dqResources,
      workgroups: [dqGroups, d.nH, d.B],
      uniforms: u,
    }),
    bindKernel(ctx, dkv, {
      label: `${op}.dkv ${name}`,
      resources: [...common, io.dk, io.dv],
      workgroups: [dkvGroups, d.nKV, d.B],
      uniforms: u,
    }),
  );
  return plan;
}

/** Whether any two of these places overlap. */
function overlap(places: readonly Tensor[]): boolean {
  return places.some((a, i) =>
    places.some(
      (b, j) => j > i && a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength,
    ),
  );
}

/**
 * FLOPs (a multiply-add counts 2) for the visible (query, key) pairs: the forward does q·k and
 * p·v (4·hd per pair); the backward recomputes q·k and dout·v in both kernels and does dq, dk and
 * dv (14·hd per pair).
 */
export function attentionFlops(dims: AttentionDims): { forward: number; backward: number } {
  const d = resolveAttentionDims(dims);
  let pairs = 0;
  for (let i = 0; i < d.Tq; i++) pairs += Math.min(d.Tk, d.pos0 + i + 1);
  const n = pairs * d.B * d.nH * d.hd;
  return { forward: 4 * n, backward: 14 * n };
}
