import actMath from '../../../../shaders/act_math.wgsl?raw';
import matmulSource from '../../../../shaders/matmul.wgsl?raw';
import matvecReduce from '../../../../shaders/matvec_reduce.wgsl?raw';
import matvecReduceSubgroups from '../../../../shaders/matvec_reduce_subgroups.wgsl?raw';
import ropeMath from '../../../../shaders/rope_math.wgsl?raw';
import tileF16 from '../../../../shaders/tile_f16.wgsl?raw';
import tileF32 from '../../../../shaders/tile_f32.wgsl?raw';
import type { GpuContext } from '../context.js';
import { LimitExceededError, ShapeError } from '../errors.js';
import {
  bindKernel,
  type Dispatch,
  getKernel,
  type Kernel,
  type KernelSpec,
  packUniforms,
  type Resource,
} from '../kernel.js';
import type { MatmulStaging } from '../profile.js';
import { gpuQuantLayout, isQuantFormat } from '../quant.js';
import { formatShape } from '../shape.js';
import type { DType, Tensor } from '../tensor.js';
import { composeShader, type ShaderExtension, type ShaderPart } from './compose.js';

// A module is composed of the tiles' element type and products (tile_f32.wgsl, or tile_f16.wgsl
// with f16 enabled), the matrix-vector kernels' reduction (a workgroup-memory tree, or subgroup
// operations), the activation epilogues' formulas (act_math.wgsl, shared with activations.wgsl),
// RoPE's cos and sin (rope_math.wgsl, shared with rope.wgsl and the attention kernels), then the
// kernels. Four builds, each composed once.
const ACT_MATH: ShaderPart = { file: 'shaders/act_math.wgsl', source: actMath };
const ROPE_MATH: ShaderPart = { file: 'shaders/rope_math.wgsl', source: ropeMath };
const MATMUL_WGSL: ShaderPart = { file: 'shaders/matmul.wgsl', source: matmulSource };
const TILES = {
  f32: { file: 'shaders/tile_f32.wgsl', source: tileF32 },
  f16: { file: 'shaders/tile_f16.wgsl', source: tileF16 },
};
const MATVEC_REDUCE = {
  tree: { file: 'shaders/matvec_reduce.wgsl', source: matvecReduce },
  subgroups: { file: 'shaders/matvec_reduce_subgroups.wgsl', source: matvecReduceSubgroups },
};
const SOURCES = new Map<string, ShaderPart>();
for (const tiles of ['f32', 'f16'] as const) {
  for (const reduce of ['tree', 'subgroups'] as const) {
    const extensions: ShaderExtension[] = [];
    if (tiles === 'f16') extensions.push('f16');
    if (reduce === 'subgroups') extensions.push('subgroups');
    SOURCES.set(
      `${tiles} ${reduce}`,
      composeShader(extensions, [TILES[tiles], MATVEC_REDUCE[reduce], ACT_MATH, ROPE_MATH, MATMUL_WGSL]),
    );
  }
}

/** An entry point of matmul.wgsl and its bindings; `spec` adds the source this device gets. */
interface Entry {
  readonly entryPoint: string;
  readonly bindings: KernelSpec['bindings'];
}

const spec = (ctx: GpuContext, e: Entry, tiles: TileMath): KernelSpec => ({
  ...(SOURCES.get(`${tiles} ${ctx.features.subgroups ? 'subgroups' : 'tree'}`) as ShaderPart),
  ...e,
});

const BINDINGS = ['uniform', 'read', 'read', 'read', 'read', 'read', 'write'] as const;
// + 7 gate (read), 8 the activation (written)
const ACT_BINDINGS = [...BINDINGS, 'read', 'write'] as const;
// Without the bias (3): + 7 gate or pre-activation, 8 up (read), 9 dup (written)
const ACT_BWD_BINDINGS = ['uniform', 'read', 'read', 'none', 'read', 'read', 'write', 'read', 'read', 'write'] as const;

const MATMUL: Entry = { entryPoint: 'matmul', bindings: BINDINGS };
const MATVEC: Entry = { entryPoint: 'matvec', bindings: BINDINGS };
const MATMUL_ACT: Entry = { entryPoint: 'matmul_act', bindings: ACT_BINDINGS };
const MATVEC_ACT: Entry = { entryPoint: 'matvec_act', bindings: ACT_BINDINGS };
const MATMUL_ACT_BWD: Entry = { entryPoint: 'matmul_act_bwd', bindings: ACT_BWD_BINDINGS };
// The second product (matmul_sum): + 10 A3, 11 W3 (7..9 unused). 8 storage buffers.
const SUM_BINDINGS = [...BINDINGS, 'none', 'none', 'none', 'read', 'read'] as const;
// The gated MLP (matmul_glu, matvec_glu): no bias; 8 act, 11 W3 (up's weight), 12 up. 8 storage buffers.
const GLU_BINDINGS = [
  'uniform',
  'read',
  'read',
  'none',
  'read',
  'read',
  'write',
  'none',
  'write',
  'none',
  'none',
  'read',
  'write',
] as const;
// Two projections (matmul_pair, matvec_pair): as the gated MLP without the activation. 7 storage buffers.
const PAIR_BINDINGS = GLU_BINDINGS.map((b, i) => (i === 8 ? 'none' : b));
const MATMUL_SUM: Entry = { entryPoint: 'matmul_sum', bindings: SUM_BINDINGS };
const MATMUL_GLU: Entry = { entryPoint: 'matmul_glu', bindings: GLU_BINDINGS };
const MATVEC_GLU: Entry = { entryPoint: 'matvec_glu', bindings: GLU_BINDINGS };
const MATMUL_PAIR: Entry = { entryPoint: 'matmul_pair', bindings: PAIR_BINDINGS };
const MATVEC_PAIR: Entry = { entryPoint: 'matvec_pair', bindings: PAIR_BINDINGS };
// The gated MLP behind its RMSNorm (matmul_glu_norm): glu's without the unused low-rank operands
// (4, 5), + 14 the norm's gain (read), 15 rstd (written). 8 storage buffers.
const GLU_NORM_BINDINGS = [
  ...GLU_BINDINGS.map((b, i) => (i === 4 || i === 5 ? 'none' : b)),
  'none',
  'read',
  'write',
] as const;
// C = product + residual (matmul_resid): + 16 resid (read). 7 storage buffers.
const RESID_BINDINGS = [...BINDINGS, ...Array<'none'>(9).fill('none'), 'read'] as const;
const MATMUL_RESID: Entry = { entryPoint: 'matmul_resid', bindings: RESID_BINDINGS };
const MATMUL_GLU_NORM: Entry = { entryPoint: 'matmul_glu_norm', bindings: GLU_NORM_BINDINGS };
// LoRA's h inside the dispatch (matmul_lora_h): 4 holds LoRA's A instead of A2, + 17 h (written).
// 7 storage buffers; through the RoPE epilogue (matmul_lora_h_rope) + 13 inv_freq, 8.
const LORA_H_BINDINGS = [...BINDINGS, ...Array<'none'>(10).fill('none'), 'write'] as const;
const LORA_H_ROPE_BINDINGS = LORA_H_BINDINGS.map((b, i) => (i === 13 ? 'read' : b));
const MATMUL_LORA_H: Entry = { entryPoint: 'matmul_lora_h', bindings: LORA_H_BINDINGS };
const MATMUL_LORA_H_ROPE: Entry = { entryPoint: 'matmul_lora_h_rope', bindings: LORA_H_ROPE_BINDINGS };
// dx through an RMSNorm's backward (matmul_norm_bwd): 1 d_out, 2 W, 6 dx, 14 the gain, 18 dn, 19 x,
// 20 rstd (read), 21 d_mid (written). 8 storage buffers.
const NORM_BWD_BINDINGS = [
  'uniform',
  'read',
  'read',
  'none',
  'none',
  'none',
  'write',
  ...Array<'none'>(7).fill('none'),
  'read',
  'none',
  'none',
  'none',
  'read',
  'read',
  'read',
  'write',
] as const;
const MATMUL_NORM_BWD: Entry = { entryPoint: 'matmul_norm_bwd', bindings: NORM_BWD_BINDINGS };
// The gated MLP's dx through its nonlinearity's backward (matmul_glu_bwd): 1 ∂L/∂act, 2 W (gate's),
// 6 C, 7 gate, 8 up (read), 11 W3 (up's). 6 storage buffers.
const GLU_BWD_BINDINGS = [
  'uniform',
  'read',
  'read',
  'none',
  'none',
  'none',
  'write',
  'read',
  'read',
  'none',
  'none',
  'read',
] as const;
const MATMUL_GLU_BWD: Entry = { entryPoint: 'matmul_glu_bwd', bindings: GLU_BWD_BINDINGS };
// The loss's ∂L/∂H through dz formed as the logits are staged (matmul_dlogits): 1 logits, 2 W,
// 6 C, 23 labels, 24 lse, 25 coef (read). 6 storage buffers.
const DLOGITS_BINDINGS = [
  'uniform',
  'read',
  'read',
  'none',
  'none',
  'none',
  'write',
  ...Array<'none'>(16).fill('none'),
  'read',
  'read',
  'read',
] as const;
const MATMUL_DLOGITS: Entry = { entryPoint: 'matmul_dlogits', bindings: DLOGITS_BINDINGS };
// Up to three products and two low-rank terms (matmul_sum_lr): matmul_sum's without the bias (3),
// + 22 W4 (read). 8 storage buffers.
const SUM_LR_BINDINGS = [
  ...SUM_BINDINGS.map((b, i) => (i === 3 ? 'none' : b)),
  ...Array<'none'>(10).fill('none'),
  'read',
] as const;
const MATMUL_SUM_LR: Entry = { entryPoint: 'matmul_sum_lr', bindings: SUM_LR_BINDINGS };
// The RoPE epilogue's entries: + 13 inv_freq (read). matmul_rope 7 storage buffers, the pairs 8.
const ROPE_BINDINGS = [...BINDINGS, 'none', 'none', 'none', 'none', 'none', 'none', 'read'] as const;
const PAIR_ROPE_BINDINGS = [...PAIR_BINDINGS, 'read'] as const;
const MATMUL_ROPE: Entry = { entryPoint: 'matmul_rope', bindings: ROPE_BINDINGS };
const MATVEC_ROPE: Entry = { entryPoint: 'matvec_rope', bindings: ROPE_BINDINGS };
const MATMUL_PAIR_ROPE: Entry = { entryPoint: 'matmul_pair_rope', bindings: PAIR_ROPE_BINDINGS };
/** The entries whose products all read straight from the buffers with DIRECT (matmul.wgsl). */
const DIRECT_ENTRIES: ReadonlySet<Entry> = new Set([
  MATMUL,
  MATMUL_RESID,
  MATMUL_ROPE,
  MATMUL_ACT,
  MATMUL_ACT_BWD,
  MATMUL_SUM,
  MATMUL_SUM_LR,
  MATMUL_GLU,
  MATMUL_PAIR,
  MATMUL_PAIR_ROPE,
]);
const MATVEC_PAIR_ROPE: Entry = { entryPoint: 'matvec_pair_rope', bindings: PAIR_ROPE_BINDINGS };
// q, k and v in one dispatch (matmul_qkv): 1 A, 2 W, 4 the h, 5 the B, 6 q|k|v, 11 W3, 22 W4 (no
// bias); + 13 inv_freq with RoPE. 7 storage buffers, 8 with RoPE.
const QKV_BINDINGS = [...SUM_LR_BINDINGS.map((b, i) => (i === 10 ? 'none' : b))] as const;
const QKV_ROPE_BINDINGS = QKV_BINDINGS.map((b, i) => (i === 13 ? 'read' : b));
const MATMUL_QKV: Entry = { entryPoint: 'matmul_qkv', bindings: QKV_BINDINGS };
const MATMUL_QKV_ROPE: Entry = { entryPoint: 'matmul_qkv_rope', bindings: QKV_ROPE_BINDINGS };

/**
 * The MLP nonlinearity a matmul stores through (matmul.wgsl's activation epilogues), so that it
 * costs no dispatch of its own. 'silu_mul': C is the up projection and `act` = silu(gate)·C;
 * 'gelu': C is the pre-activation (after the bias) and `act` = gelu_new(C).
 */
export type MatmulActivation =
  | { readonly kind: 'silu_mul'; readonly gate: Tensor; readonly act: Tensor }
  | { readonly kind: 'gelu'; readonly act: Tensor };

/**
 * The backward of that nonlinearity on a product that is ∂L/∂act (the down projection's dx):
 * 'silu_mul': C takes ∂L/∂gate and `dup` ∂L/∂up; 'gelu': C takes ∂L/∂pre.
 */
export type MatmulActivationBackward =
  | { readonly kind: 'silu_mul'; readonly gate: Tensor; readonly up: Tensor; readonly dup: Tensor }
  | { readonly kind: 'gelu'; readonly pre: Tensor };

/**
 * RoPE applied as the product is stored (matmul.wgsl's RoPE epilogue), so that the q and k
 * projections come out rotated with no dispatch of their own: rope.wgsl's rope_fwd on C and/or on
 * `second`'s output, with positions pos0 + row % T. N must be a whole number of heads.
 */
export interface MatmulRope {
  /** headDim / 2 f32 frequencies (the model's inv_freq). */
  readonly invFreq: Tensor;
  readonly headDim: number;
  readonly T: number;
  readonly pos0?: number;
  /** HF's attention_scaling; default 1. */
  readonly scaling?: number;
  /** Which outputs are rotated: C, `second.out`, or both (v beside k is not). */
  readonly c: boolean;
  readonly second: boolean;
}

/** Rows of A up to which the matrix-vector kernel replaces the tiled one (MV_M in the shader). */
export const MATVEC_MAX_ROWS = 4;
/**
 * How the matvec kernel splits the work (see shaders/matmul.wgsl): 'split-k' has 64 invocations
 * share each group of 4 columns along K (coalesced reads, a reduction in workgroup memory: real
 * GPUs); 'rows' gives each invocation whole rows of W, 256 columns per workgroup, with no
 * reduction and no barrier (CPU-backed adapters, where those cost more than they save).
 */
export type MatvecVariant = 'split-k' | 'rows';

/** The matvec variant planMatmul uses on this device unless told otherwise. */
export function matvecVariant(ctx: GpuContext): MatvecVariant {
  return isCpuAdapter(ctx) ? 'rows' : 'split-k';
}

function matvecShape(variant: MatvecVariant): { MV_K: number; MV_N: number } {
  return variant === 'rows' ? { MV_K: 1, MV_N: 64 } : { MV_K: 64, MV_N: 1 };
}

/** Whether C = A·Wᵀ takes the matrix-vector kernel: a few rows of A (decoding), W transposed,
 * and its workgroups along N within the device's limit. */
export function usesMatvec(
  ctx: GpuContext,
  dims: MatmulDims,
  transW: boolean,
  variant: MatvecVariant = matvecVariant(ctx),
): boolean {
  const columnsPerWorkgroup = 4 * matvecShape(variant).MV_N;
  return (
    transW &&
    dims.M <= MATVEC_MAX_ROWS &&
    Math.ceil(dims.N / columnsPerWorkgroup) <= ctx.limits.maxComputeWorkgroupsPerDimension
  );
}

export interface MatmulOptions {
  /** W is stored N×K (out×in, as nn.Linear keeps weights) and used transposed. Default true. */
  transW?: boolean;
  alpha?: number;
  /** C = ... + beta·C: 0 overwrites (default), 1 accumulates. */
  beta?: number;
  /** Added to every row of C; N values. */
  bias?: Tensor;
  /** alpha2·A2·opW(B2) continues the same accumulators: the LoRA term. A2 is M×K2; B2 is N×K2
   * when transW, else K2×N. Staged through the tiles with f32 tiles; read and multiplied in f32
   * from memory beside f16 tiles when transW, else (the backward's s·g·A, under a loss scale)
   * staged in f16 as well.
   *
   * `a2From` (LoRA's A, K2×K): A2 = A·a2Fromᵀ is computed in this dispatch from the staged tiles
   * of A and stored into a2 (matmul_lora_h), instead of being read from an earlier dispatch: the
   * LoRA forward in one dispatch (with f16 tiles, in f32 from the f16-staged A). transW and the
   * tiled kernel only (more than MATVEC_MAX_ROWS rows), K2 up to LORA_H_MAX_RANK; bias, beta or
   * `rope` (on C), no other epilogue.
   */
  lowRank?: {
    a2: Tensor;
    b2: Tensor;
    alpha2: number;
    a2From?: Tensor;
    /**
     * A second low-rank term alpha2·A2·opW(B2) of the same layout (another adapted projection's
     * s·g·A in a dx of two or three projections): its A2 a place in the first A2's buffer and its B2
     * in the first B2's (LoRA's g slots, the LoRA parameters' arena); the dispatch binds the range
     * of each buffer that holds both. With `extra` only (matmul_sum_lr).
     */
    second?: { a2: Tensor; b2: Tensor; alpha2: number };
    /** A third such term (the third adapted projection of q, k and v), with `second`, its places
     * in the same buffers. */
    third?: { a2: Tensor; b2: Tensor; alpha2: number };
  };
  /** Use only rows [start, start + count) of W as stored: with transW a chunk of its N output rows
   * (the LM head's vocabulary), otherwise a chunk of its K rows (dh += dlogits·E over the same
   * chunk). No copy and no separately bound buffer. */
  wRows?: { start: number; count: number };
  /** The matvec kernel's split when M ≤ MATVEC_MAX_ROWS; default matvecVariant(ctx). Tests set it. */
  matvecVariant?: MatvecVariant;
  /** How the tiled kernel reads its operands; default ctx.matmulStaging (measured). The bench runs
   * both. */
  staging?: MatmulStaging;
  /**
   * The tiled kernel's staged type and products: 'f32' (the default) or 'f16' with f32
   * accumulation (shaders/tile_f16.wgsl; needs shader-f16). `f16TileMathApplies` says where f16 is
   * safe to ask for. The matrix-vector kernel always multiplies in f32.
   */
  tileMath?: TileMath;
  /**
   * A's values, and those of every other gradient the product reads, carry a dynamic loss scale
   * (loss_scale.ts): f16 tiles may stage them (f16TileMathApplies). Says nothing else.
   */
  lossScaled?: boolean;
  /** Store C through an activation as well (see MatmulActivation). */
  activation?: MatmulActivation;
  /** C is ∂L/∂act: store the activation's backward instead (no bias, beta 0; tiled kernel). */
  activationBackward?: MatmulActivationBackward;
  /**
   * A second dense product in the same tile loop: C = alpha·(A·opW(W) + A3·opW(W3)) + ...
   * (matmul_sum). A3 is M×K3; W3 is laid out like W (N×K3 when transW, else K3×N) in any of W's
   * storage formats. The backward's dx of two projections that share an input, in one dispatch.
   */
  extra?: {
    readonly a: Tensor;
    readonly w: Tensor;
    /** A third product A4·opW(W4) in the same loop (matmul_sum_lr): A4 a place in A3's buffer (dk
     * and dv, say), W4 in any of W's storage formats. */
    readonly third?: { readonly a: Tensor; readonly w: Tensor };
  };
  /**
   * The gated MLP: C is the gate projection A·Wᵀ, `up` gets A·W3ᵀ (W3 N×K, any storage format)
   * and `act` silu(C)·up, in one dispatch (matmul_glu / matvec_glu). transW only; no bias, beta,
   * low-rank term, wRows or other epilogue.
   */
  glu?: { readonly w: Tensor; readonly up: Tensor; readonly act: Tensor };
  /**
   * With `glu`: A is the RMSNorm's input, and the product takes RMSNorm(A) = (A·rstd)·w as the norm
   * dispatch would have written it (matmul_glu_norm), so the norm costs no dispatch of its own and
   * its output is never stored. `rstd` gets one f32 per row of A (what the norm's backward reads).
   * Tiled kernel only: not for M ≤ MATVEC_MAX_ROWS (usesMatvec), where the decode step keeps its
   * norm dispatch.
   */
  norm?: { readonly w: Tensor; readonly rstd: Tensor; readonly eps: number };
  /**
   * C = product (+ bias) + residual, M×N f32 read from its own buffer, in place of beta·C
   * (matmul_resid): a block's last projection adding the residual stream where C is not already
   * holding it. Tiled kernel only (not for M ≤ MATVEC_MAX_ROWS); no beta or other epilogue.
   */
  residual?: Tensor;
  /**
   * A is ∂L/∂out of a block whose output is out = mid + f(RMSNorm(mid)) (the residual gradient),
   * and the product is taken of ∂L/∂mid = A + RMSNorm's backward of `dn` (∂L/∂ its output), formed
   * as A is staged (matmul_norm_bwd): the norm's backward costs no dispatch of its own. `x` is the
   * norm's input (mid), `w` its gain, `rstd` its saved rstd; ∂L/∂mid is also written to `dMid`
   * (another buffer than A, dn and x). f32 tiles (f16 under a loss scale) and the tiled kernel only; no bias, beta, row
   * range, low-rank term or epilogue.
   */
  normBackward?: {
    readonly dn: Tensor;
    readonly x: Tensor;
    readonly w: Tensor;
    readonly rstd: Tensor;
    readonly dMid: Tensor;
  };
  /**
   * A is ∂L/∂act of an unadapted gated MLP (silu·mul), and C = d_gate·opW(W) + d_up·opW(W3), where
   * d_gate and d_up are the nonlinearity's backward of A at the forward's `gate` and `up` (M×K
   * f32), formed as the tiles are staged (matmul_glu_bwd): the dx of gate and up without a
   * dispatch that stores d_gate and d_up, which leaves the down projection's dx free for the next
   * layer's norm backward (normBackward). W3 (up's weight) is shaped like W (gate's). f32 tiles (f16 under a loss scale) and
   * the tiled kernel only; no bias, beta, row range, low-rank term or other prologue or epilogue.
   */
  gluBackward?: { readonly gate: Tensor; readonly up: Tensor; readonly w3: Tensor };
  /**
   * A is a chunk of the LM head's logits (M×K: vocabulary entries start..start+K), and the product
   * is taken of the loss's dz = (exp(A − lse) − onehot(label))·coef[2], formed as A is staged
   * (matmul_dlogits; shaders/cross_entropy.wgsl's conventions: labels i32 [M], -100 or outside
   * [0, vocab) ignored; lse f32 [M]; coef f32 with g / divisor in element 2, times the loss scale
   * where there is one, as the loss's forward writes it in training): the loss's ∂L/∂H without a dispatch that rewrites the logits. f32 tiles
   * (f16 under a loss scale) and the tiled kernel; beta and a row range of W allowed; no bias,
   * low-rank term or other prologue or epilogue.
   */
  dlogits?: {
    readonly labels: Tensor;
    readonly lse: Tensor;
    readonly coef: Tensor;
    readonly start: number;
    readonly vocab: number;
  };
  /**
   * A second projection of the same A: `out` gets A·W3ᵀ (W3 N×K, any storage format) while C gets
   * A·Wᵀ with its low-rank term, in one dispatch (matmul_pair / matvec_pair): q and k, say.
   * transW only; no bias, beta, wRows or epilogue.
   */
  second?: { readonly w: Tensor; readonly out: Tensor };
  /** Rotate C and/or `second`'s output by RoPE as they are stored (see MatmulRope). transW only;
   * no beta, wRows, activation, glu or extra. */
  rope?: MatmulRope;
  label?: string;
}

/** How the tiled matmul stages and multiplies (see MatmulOptions.tileMath). */
export type TileMath = 'f32' | 'f16';

/**
 * Whether f16 tiles suit this product on this device: the adapter has shader-f16 and every weight
 * of the product (W, and the second weight of `glu`, `second`, `extra`, `extra.third` or
 * `gluBackward`) is stored below f32. f16 W stages exactly; Q8_0/Q4_0 values d·q round to f16's
 * 11 bits, and A rounds too (above 65504 it overflows).
 *
 * Without `lossScaled`: only forward-layout products (transW) none of whose terms is a gradient
 * (activationBackward, the dx sums of `extra`, the backward's prologues), which f16 would flush
 * below 6e-8. A LoRA term (lowRank) is allowed: it is not staged but read and multiplied in f32
 * (matmul.wgsl's low_rank_direct), since its B starts at zero and stays small, where f16 has few
 * bits; where the dispatch forms LoRA's h itself (lowRank.a2From) it does so in f32 from the
 * f16-staged A.
 *
 * With `lossScaled` (the gradients carry a dynamic loss scale: loss_scale.ts) the backward's
 * products too: dy·W's layout, the activation's backward, the sums of `extra`, and the norm's,
 * gated MLP's and loss's prologues, whose scaled gradients f16 holds. An overflow there becomes a
 * gradient that is not finite, which the scale's update answers. A low-rank term of the backward's
 * layout (s·g·A in dx) is staged in f16 like the rest: its A is LoRA's A, whose values are not small.
 * planMatmul refuses f16 tiles where this does not hold.
 */
export function f16TileMathApplies(ctx: GpuContext, w: Tensor, opts: MatmulOptions = {}): boolean {
  const below = (t: Tensor | undefined) => t === undefined || t.dtype !== 'f32';
  if (!ctx.features.shaderF16 || !below(w) || !below(opts.glu?.w) || !below(opts.second?.w)) return false;
  if (opts.lossScaled) return below(opts.extra?.w) && below(opts.extra?.third?.w) && below(opts.gluBackward?.w3);
  return (
    (opts.transW ?? true) &&
    !opts.activationBackward &&
    !opts.extra &&
    !opts.normBackward &&
    !opts.gluBackward &&
    !opts.dlogits
  );
}

/**
 * `opts` with f16 tiles under a loss scale (tileMath 'f16', lossScaled) where `tileMath` asks for
 * them and f16TileMathApplies allows them for W; else `opts` as given (f32 tiles). The backward's
 * products that carry gradients are planned through it.
 */
export function lossScaledTiles(
  ctx: GpuContext,
  w: Tensor,
  opts: MatmulOptions,
  tileMath: TileMath | undefined,
): MatmulOptions {
  return tileMath === 'f16' && f16TileMathApplies(ctx, w, { ...opts, lossScaled: true })
    ? { ...opts, tileMath: 'f16', lossScaled: true }
    : opts;
}

/**
 * The tile math generation takes unless asked otherwise: f16 on GPUs with shader-f16, where f16
 * operands halve the bytes the tiles move and f16 arithmetic runs at (at least) twice f32's rate;
 * f32 elsewhere. Its logits stay within a small multiple of how far transformers computing in f16
 * lands from the same f32 reference (f16_tiles.test.ts against tools/golden_f16_math.py). CPU
 * adapters keep f32: a CPU has no faster f16 arithmetic to pay for the rounding (not measured
 * here: the only adapter with shader-f16, Mesa 25's lavapipe, runs under Node, where the bench
 * does not). Training's forward takes the same rule (trainingTileMath).
 */
export function inferenceTileMath(ctx: GpuContext): TileMath {
  return ctx.features.shaderF16 && !isCpuAdapter(ctx) ? 'f16' : 'f32';
}

/**
 * The tile math a training step takes unless asked otherwise: as inferenceTileMath (f16 on GPUs
 * with shader-f16). Its forward takes it for the forward-layout products of weights stored below
 * f32 (f16TileMathApplies) and the tiled attention forward, whose backward then reads q, k and v
 * rounded as it staged them (AttentionForwardArgs.tileMath); its backward for the products that
 * carry gradients (dy·W with its prologues and epilogues, the loss's dH), under a dynamic loss
 * scale (loss_scale.ts) that keeps the small gradients inside f16's range, and the tiled attention's
 * backward likewise (AttentionBackwardArgs.gradTileMath). LoRA's own gradient kernels (g, dB, dA)
 * and the loss's logits stay f32. The LoRA gradients
 * stay within f16's bounds of PEFT on the same weights (train_f16.test.ts).
 */
export function trainingTileMath(ctx: GpuContext): TileMath {
  return inferenceTileMath(ctx);
}

/**
 * The largest rank whose h matmul_lora_h keeps in workgroup memory (MatmulOptions.lowRank.a2From):
 * 4·WG_Y rows × 16 f32 (4 KiB) and LoRA's A staged TK at a time (1 KiB) beside the GPU tile's 10 KiB
 * are 15 KiB, inside WebGPU's 16 KiB minimum. Each
 * workgroup forms h for its rows again, r products per staged element against the 4·WG_X of the
 * main product (a quarter more work at r = 16 on the GPU tile): the in-dispatch h is for small
 * ranks, and larger ones keep their h dispatch.
 */
export const LORA_H_MAX_RANK = 16;

export interface MatmulDims {
  readonly M: number;
  readonly N: number;
  readonly K: number;
}

interface TileConfig {
  wgX: number;
  wgY: number;
  tk: number;
}

/**
 * Chooses the tile. On GPUs: 64×64 with 256 invocations (16×16 when M or N is thin: a few
 * tokens, or a rank-r operand). On CPU-backed adapters (SwiftShader, lavapipe), where every
 * invocation of a workgroup is a coroutine switched at each barrier, 32×32 with 64 invocations
 * and a deeper K step. Few distinct shapes: each is another pipeline to compile.
 */
export function matmulTile(ctx: GpuContext, dims: MatmulDims): TileConfig {
  const cpu = isCpuAdapter(ctx);
  let wgX = cpu ? CPU_TILE.wgX : 16;
  let wgY = cpu ? CPU_TILE.wgY : 16;
  if (dims.M <= 16 && dims.N > dims.M) wgY = 4;
  else if (dims.N <= 16) wgX = 4;
  while (wgX * wgY > ctx.limits.maxComputeInvocationsPerWorkgroup) {
    if (wgY >= wgX) wgY /= 2;
    else wgX /= 2;
  }
  let tk = cpu ? CPU_TILE.tk : 16;
  while (tileBytes({ wgX, wgY, tk }) > ctx.limits.maxComputeWorkgroupStorageSize && tk > 4) tk /= 2;
  return { wgX, wgY, tk };
}

/** The CPU profile's tile for products that are not thin. */
const CPU_TILE: TileConfig = { wgX: 8, wgY: 8, tk: 32 };

/** The matmul profile.ts's measureMatmulStaging times both ways: dy·W (the backward's layout) of
 * 128 rows against SmolLM2-135M's 576×576 with f32 operands in the CPU profile's tile, through
 * matmul.wgsl's own `matmul` entry (bindings 0 the uniforms, 1 A, 2 W, 3 bias, 4 A2, 5 B2, 6 C;
 * `dims` sizes them). W as large as a real projection's: on SwiftShader direct wins on a 256×256 W
 * and loses on 576×576 and larger, where its repeated reads leave the cache. */
export function matmulStagingProbe(): {
  readonly source: string;
  readonly entryPoint: string;
  readonly dims: MatmulDims;
  readonly uniforms: ArrayBuffer;
  readonly workgroups: readonly [number, number];
  readonly constants: (direct: boolean) => Record<string, number | boolean>;
} {
  const dims = { M: 128, N: 576, K: 576 };
  return {
    source: (SOURCES.get('f32 tree') as ShaderPart).source,
    entryPoint: MATMUL.entryPoint,
    dims,
    uniforms: matmulParams({ M: dims.M, N: dims.N, K: dims.K }),
    workgroups: [dims.N / (4 * CPU_TILE.wgX), dims.M / (4 * CPU_TILE.wgY)],
    constants: (direct) => ({
      WG_X: CPU_TILE.wgX,
      WG_Y: CPU_TILE.wgY,
      TK: direct ? 4 : CPU_TILE.tk,
      TRANS_W: false,
      ALIGNED: true,
      DIRECT: direct,
    }),
  };
}

/** Workgroup memory of a tile's a_tile and w_tile: 4·WG·(TK/4 + 1) vec4s each. */
function tileBytes(tile: TileConfig): number {
  return 16 * 4 * (tile.wgX + tile.wgY) * (tile.tk / 4 + 1);
}

/**
 * Whether the RMSNorm before an unadapted gated MLP pays for going inside the gate and up
 * projections' dispatch (MatmulOptions.norm, matmul_glu_norm): on GPUs, where it saves a dispatch
 * and a round trip of the normalized rows through memory. Not on CPU-backed adapters: there the
 * fused kernel measured 0.87 and 0.96 of the norm dispatch plus matmul_glu (median ratios,
 * SwiftShader and lavapipe in Chromium, 512×1536×576; `pnpm bench --suite kernels --only
 * glu_norm`), its per-workgroup norm and normalized staging costing more than the dispatch saved.
 */
export function normInMlpPays(ctx: GpuContext): boolean {
  return !isCpuAdapter(ctx);
}

/**
 * Whether an adapted projection pays for forming LoRA's h in its own matmul (MatmulOptions.lowRank's
 * a2From, matmul_lora_h) rather than in a thin dispatch before it: on GPUs, where the dispatch and
 * the second pass over x cost more than the r products per staged element that every workgroup
 * along a row of tiles repeats (r/64 of the main product on the GPU tile: an eighth at r = 8). Not
 * on CPU-backed adapters: there it measured 0.85 (SwiftShader) and 0.59 (lavapipe) of the h
 * dispatch followed by the matmul at r = 8, 0.67 and 0.45 at r = 16 (median ratios, 512×576×576;
 * `pnpm bench --suite kernels --only lora_h_in_matmul`), their tile being 32 columns wide and
 * compute, not dispatches, their cost.
 */
export function loraHInMatmulPays(ctx: GpuContext): boolean {
  return !isCpuAdapter(ctx);
}

/**
 * Whether a layer's q, k and v projections pay for being one dispatch (planQkvMatmul) rather than
 * q's and k and v's pair (matmul_pair): on GPUs, where it saves a dispatch and spreads q, k and v
 * over more workgroups at once. Not on CPU-backed adapters, where each workgroup stages its rows
 * of x for one product instead of two: there it measured 0.83 (SwiftShader, p 0.031) and 1.04
 * (lavapipe, p 0.69) of the two dispatches (median ratios of 6 rounds, SmolLM2-135M's q, k and v
 * at 512 rows, q and v adapted, RoPE; `pnpm bench --suite kernels --only qkv_fwd_one`).
 */
export function qkvInOnePays(ctx: GpuContext): boolean {
  return !isCpuAdapter(ctx);
}

/**
 * Whether the q and k projections pay for rotating by RoPE as they store (MatmulOptions.rope)
 * rather than leave it to a RoPE dispatch after them: on GPUs, where it saves that dispatch and a
 * round trip of q and k through memory. Not on CPU-backed adapters, where each workgroup computes
 * the rotation's sines and cosines for its own tile: there it ran at 0.95× the speed of the
 * product followed by the RoPE dispatch (SwiftShader and lavapipe, 2026-12-05), 0.89× on lavapipe
 * reading its operands directly (2026-12-07), slower either way (median ratios, the q projection at 512×576×576, r = 8;
 * `pnpm bench --suite kernels --only matmul_rope`), and the plan's RoPE dispatch rotates q and k
 * together, cheaper than that baseline's one per projection.
 */
export function ropeInMatmulPays(ctx: GpuContext): boolean {
  return !isCpuAdapter(ctx);
}

/** Whether the device gets the kernel configurations for CPU-backed drivers (SwiftShader,
 * lavapipe): the context's kernel profile, from the adapter's info or measured (profile.ts). */
export function isCpuAdapter(ctx: GpuContext): boolean {
  return ctx.kernelProfile === 'cpu';
}

/** M, N, K of C = A·opW(W), after checking every operand's shape. */
export function matmulDims(a: Tensor, w: Tensor, c: Tensor, opts: MatmulOptions = {}): MatmulDims {
  const op = opts.label ?? 'matmul';
  const transW = opts.transW ?? true;
  if (w.shape.length !== 2) throw new ShapeError(`${op}: W ${w.label} must be 2-D, got ${formatShape(w.shape)}`);
  const [w0, w1] = w.shape as [number, number];
  if (opts.wRows) {
    const { start, count } = opts.wRows;
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(count) || start < 0 || count < 1 || start + count > w0) {
      throw new ShapeError(`${op}: rows [${start}, ${start + count}) are outside W ${w.label} ${formatShape(w.shape)}`);
    }
  }
  // wRows selects rows of W as stored: output columns (N) when transposed, K otherwise.
  const rows = opts.wRows?.count ?? w0;
  const N = transW ? rows : w1;
  const K = transW ? w1 : rows;
  const aInner = a.shape[a.shape.length - 1] as number;
  if (aInner !== K) {
    throw new ShapeError(
      `${op}: A ${a.label} ${formatShape(a.shape)} has inner dimension ${aInner}, but W ${w.label} ${formatShape(w.shape)}${transW ? 'ᵀ' : ''} needs ${K}`,
    );
  }
  const M = a.size / K;
  const cInner = c.shape[c.shape.length - 1] as number;
  if (cInner !== N || c.size !== M * N) {
    throw new ShapeError(`${op}: C ${c.label} ${formatShape(c.shape)} must hold ${M}×${N}`);
  }
  if (a.dtype !== 'f32' || c.dtype !== 'f32') throw new ShapeError(`${op}: A and C must be f32`);
  if (!isWeightDType(w.dtype)) throw new ShapeError(`${op}: W must be f32, f16, q8_0 or q4_0, got ${w.dtype}`);
  if (opts.bias && (opts.bias.size !== N || opts.bias.dtype !== 'f32')) {
    throw new ShapeError(`${op}: bias ${opts.bias.label} ${formatShape(opts.bias.shape)} must be ${N} f32 values`);
  }
  if (opts.lowRank) {
    const { a2, b2 } = opts.lowRank;
    const K2 = a2.shape[a2.shape.length - 1] as number;
    if (a2.size !== M * K2) throw new ShapeError(`${op}: A2 ${a2.label} ${formatShape(a2.shape)} must be ${M}×r`);
    const want = transW ? [N, K2] : [K2, N];
    if (b2.shape.length !== 2 || b2.shape[0] !== want[0] || b2.shape[1] !== want[1]) {
      throw new ShapeError(
        `${op}: B2 ${b2.label} ${formatShape(b2.shape)} must be ${formatShape(want)} to match A2 ${formatShape(a2.shape)} and N = ${N}`,
      );
    }
    if (a2.dtype !== 'f32' || b2.dtype !== 'f32') throw new ShapeError(`${op}: the low-rank operands must be f32`);
  }
  return { M, N, K };
}

/** Whether whole vec4 loads apply: the contiguous dimension of A (K) and of W is a multiple of 4. */
export function matmulAligned(dims: MatmulDims, transW: boolean, wOffset = 0): boolean {
  return dims.K % 4 === 0 && (transW || dims.N % 4 === 0) && wOffset % 4 === 0;
}

/**
 * Plans C = alpha·A·opW(W) + alpha2·A2·opW(B2) + beta·C + bias. The returned dispatch is
 * recorded into a StepEncoder as often as needed and disposed by the caller.
 */
export async function planMatmul(
  ctx: GpuContext,
  a: Tensor,
  w: Tensor,
  c: Tensor,
  opts: MatmulOptions = {},
): Promise<Dispatch> {
  const dims = matmulDims(a, w, c, opts);
  const transW = opts.transW ?? true;
  const wOffset = (opts.wRows?.start ?? 0) * (w.shape[1] as number);
  const lowRank = opts.lowRank;
  const K2 = lowRank ? (lowRank.a2.shape[lowRank.a2.shape.length - 1] as number) : 0;
  const common = {
    ...storageFormat('W', w),
    ALIGNED: matmulAligned(dims, transW, wOffset),
    // A2 and B2 as whole vec4s: K2 (and N, where B2's rows are N long) multiples of 4.
    ALIGNED_LR: K2 > 0 && K2 % 4 === 0 && (transW || dims.N % 4 === 0),
  };
  const label = opts.label ?? `matmul ${dims.M}x${dims.N}x${dims.K}`;
  const tiles = opts.tileMath ?? 'f32';
  if (tiles === 'f16' && !ctx.features.shaderF16) {
    throw new ShapeError(`${label}: f16 tile math needs an adapter with shader-f16, and this one has none`);
  }
  if (tiles === 'f16' && !f16TileMathApplies(ctx, w, opts)) {
    throw new ShapeError(
      `${label}: f16 tile math is for products of f16 or quantized weights, and of gradients only under a ` +
        'loss scale (f16TileMathApplies); this one keeps f32',
    );
  }
  const act = opts.activation;
  const actBwd = opts.activationBackward;
  checkActivation(ctx, label, c, opts);
  const extra = opts.extra;
  const glu = opts.glu;
  const K3 = extra ? checkExtra(label, dims, transW, extra, opts) : 0;
  // matmul_sum_lr: a third product or a second low-rank term.
  const sumLr = extra?.third !== undefined || lowRank?.second !== undefined || lowRank?.third !== undefined;
  const K4 = sumLr ? checkSumLr(label, dims, transW, opts) : 0;
  const lr2 = lowRank?.second;
  const K2b = lr2 ? (lr2.a2.shape[lr2.a2.shape.length - 1] as number) : 0;
  const lr3 = lowRank?.third;
  const K2c = lr3 ? (lr3.a2.shape[lr3.a2.shape.length - 1] as number) : 0;
  // matmul_sum_lr binds each pair of places (A3 and A4, the two A2, the two B2) as one byte range
  // of their buffer and reads each at its element offset in it (0 elsewhere: views are bound).
  const spans =
    sumLr && extra
      ? {
          a3: placeSpan(ctx, label, 'A3 and A4', [extra.a, ...(extra.third ? [extra.third.a] : [])]),
          a2: lowRank && placeSpan(ctx, label, 'the A2', [lowRank.a2, ...[lr2, lr3].flatMap((t) => (t ? [t.a2] : []))]),
          b2: lowRank && placeSpan(ctx, label, 'the B2', [lowRank.b2, ...[lr2, lr3].flatMap((t) => (t ? [t.b2] : []))]),
        }
      : undefined;
  const at = (t: Tensor | undefined) => {
    if (!spans || !t) return 0;
    for (const span of [spans.a3, spans.a2, spans.b2]) if (span?.holds(t)) return span.at(t);
    return 0;
  };
  if (spans && lowRank) {
    // The places' offsets, and the other terms' ranks, in whole vec4s too.
    const places = [lowRank.a2, lowRank.b2, ...[lr2, lr3].flatMap((t) => (t ? [t.a2, t.b2] : []))];
    common.ALIGNED_LR &&= K2b % 4 === 0 && K2c % 4 === 0 && places.every((t) => at(t) % 4 === 0);
  }
  const second = opts.second;
  if (glu && second) throw new ShapeError(`${label}: glu and second are exclusive`);
  if (glu) checkSecondProjection(label, w, c, transW, opts, glu.w, [glu.up, glu.act]);
  const norm = opts.norm;
  if (norm) checkNorm(ctx, label, dims, opts, norm);
  const residual = opts.residual;
  if (residual) checkResidual(ctx, label, dims, c, opts, residual);
  const a2From = lowRank?.a2From;
  if (a2From) checkLoraH(ctx, label, dims, opts, a2From, K2);
  const normBwd = opts.normBackward;
  if (normBwd) checkNormBackward(ctx, label, dims, a, c, opts, normBwd);
  const gluBwd = opts.gluBackward;
  if (gluBwd) checkGluBackward(ctx, label, dims, w, opts, gluBwd);
  const dlogits = opts.dlogits;
  if (dlogits) checkDlogits(ctx, label, dims, opts, dlogits);
  if (second) checkSecondProjection(label, w, c, transW, opts, second.w, [second.out]);
  const w3 = extra?.w ?? glu?.w ?? second?.w ?? gluBwd?.w3;
  const third: Record<string, boolean> = w3
    ? {
        ...storageFormat('W3', w3),
        ...(extra?.third ? storageFormat('W4', extra.third.w) : {}),
        // matmul_sum_lr reads A3 (and A4) at their offsets in a buffer bound whole.
        ALIGNED3: extra
          ? K3 % 4 === 0 &&
            (transW || dims.N % 4 === 0) &&
            at(extra.a) % 4 === 0 &&
            (!extra.third ||
              ((extra.third.a.shape[extra.third.a.shape.length - 1] as number) % 4 === 0 &&
                at(extra.third.a) % 4 === 0))
          : transW || !gluBwd
            ? dims.K % 4 === 0
            : dims.N % 4 === 0,
      }
    : {};
  const epilogue: Record<string, number> = act || actBwd ? { ACT: (act ?? actBwd)?.kind === 'silu_mul' ? 1 : 2 } : {};
  const rope = opts.rope;
  if (rope) {
    checkRope(ctx, label, dims, transW, opts, rope);
    epilogue.ROPE = (rope.c ? 1 : 0) | (rope.second ? 2 : 0);
  }
  let kernel: Kernel;
  let workgroups: [number, number];
  const variant = opts.matvecVariant ?? matvecVariant(ctx);
  if (!actBwd && !extra && usesMatvec(ctx, dims, transW, variant)) {
    const shape = matvecShape(variant);
    const entry = glu
      ? MATVEC_GLU
      : second
        ? rope
          ? MATVEC_PAIR_ROPE
          : MATVEC_PAIR
        : act
          ? MATVEC_ACT
          : rope
            ? MATVEC_ROPE
            : MATVEC;
    kernel = await getKernel(ctx, spec(ctx, entry, 'f32'), { ...shape, ...common, ...epilogue, ...third });
    workgroups = [Math.ceil(dims.N / (4 * shape.MV_N)), 1];
  } else {
    const tile = matmulTile(ctx, dims);
    const entry = normBwd
      ? MATMUL_NORM_BWD
      : gluBwd
        ? MATMUL_GLU_BWD
        : dlogits
          ? MATMUL_DLOGITS
          : glu
            ? norm
              ? MATMUL_GLU_NORM
              : MATMUL_GLU
            : second
              ? rope
                ? MATMUL_PAIR_ROPE
                : MATMUL_PAIR
              : a2From
                ? rope
                  ? MATMUL_LORA_H_ROPE
                  : MATMUL_LORA_H
                : rope
                  ? MATMUL_ROPE
                  : extra
                    ? sumLr
                      ? MATMUL_SUM_LR
                      : MATMUL_SUM
                    : act
                      ? MATMUL_ACT
                      : actBwd
                        ? MATMUL_ACT_BWD
                        : residual
                          ? MATMUL_RESID
                          : MATMUL;
    // Straight from the buffers where the adapter measured that faster (DIRECT), in the entries
    // whose every product takes it; their tiles are then never used, and TK = 4 keeps the
    // workgroup memory the driver still zeroes at their start small.
    const direct = (opts.staging ?? ctx.matmulStaging) === 'direct' && DIRECT_ENTRIES.has(entry);
    kernel = await getKernel(ctx, spec(ctx, entry, tiles), {
      WG_X: tile.wgX,
      WG_Y: tile.wgY,
      TK: direct ? 4 : tile.tk,
      TRANS_W: transW,
      ...(direct ? { DIRECT: true } : {}),
      ...common,
      // With f16 tiles the LoRA term stays f32, read from memory rather than staged.
      // (low_rank_direct reads B2 in the TRANS_W layout, the only one f16 tiles take.)
      ...(tiles === 'f16' && K2 > 0 && transW ? { LR_DIRECT: true } : {}),
      ...epilogue,
      ...third,
      ...(norm ? { NORM_EPS: norm.eps } : {}),
      ...(a2From ? { H_R: loraHStride(K2) } : {}),
    });
    workgroups = [Math.ceil(dims.N / (4 * tile.wgX)), Math.ceil(dims.M / (4 * tile.wgY))];
  }
  const placeholder = ctx.placeholder();
  const operands = [lowRank?.a2 ?? placeholder, lowRank?.b2 ?? placeholder, c];
  let resources: Resource[];
  if (actBwd) {
    resources =
      actBwd.kind === 'silu_mul'
        ? [a, w, ...operands, actBwd.gate, actBwd.up, actBwd.dup]
        : [a, w, ...operands, actBwd.pre, placeholder, ctx.placeholder('write', 1)];
  } else if (glu && norm) {
    resources = [a, w, c, glu.act, glu.w, glu.up, norm.w, norm.rstd];
  } else if (glu) {
    resources = [a, w, ...operands, glu.act, glu.w, glu.up];
  } else if (second) {
    resources = [a, w, ...operands, second.w, second.out];
  } else if (normBwd) {
    resources = [a, w, c, normBwd.w, normBwd.dn, normBwd.x, normBwd.rstd, normBwd.dMid];
  } else if (gluBwd) {
    resources = [a, w, c, gluBwd.gate, gluBwd.up, gluBwd.w3];
  } else if (dlogits) {
    resources = [a, w, c, dlogits.labels, dlogits.lse, dlogits.coef];
  } else if (spans && extra) {
    // The places' spans; offsets in the uniforms.
    resources = [
      a,
      w,
      spans.a2?.resource ?? placeholder,
      spans.b2?.resource ?? placeholder,
      c,
      spans.a3.resource,
      extra.w,
      extra.third?.w ?? placeholder,
    ];
  } else if (a2From) {
    // In binding order: RoPE's frequencies (13) before h (17).
    const freq = rope ? [rope.invFreq] : [];
    resources = [a, w, opts.bias ?? placeholder, a2From, lowRank?.b2 as Tensor, c, ...freq, lowRank?.a2 as Tensor];
  } else {
    resources = [a, w, opts.bias ?? placeholder, ...operands];
    if (act) resources.push(act.kind === 'silu_mul' ? act.gate : placeholder, act.act);
    if (extra) resources.push(extra.a, extra.w);
    if (residual) resources.push(residual);
  }
  if (rope && !a2From) resources.push(rope.invFreq);
  const scales = (t: Tensor | undefined) =>
    t && isQuantFormat(t.dtype) ? gpuQuantLayout(t.dtype, t.size).scaleWordOffset : 0;
  return bindKernel(ctx, kernel, {
    label,
    resources,
    workgroups,
    uniforms: matmulParams({
      M: dims.M,
      N: dims.N,
      K: dims.K,
      K2,
      alpha: opts.alpha ?? 1,
      alpha2: lowRank?.alpha2 ?? 0,
      beta: opts.beta ?? 0,
      has_bias: opts.bias ? 1 : 0,
      w_off: wOffset,
      w_scales: scales(w),
      K3,
      w3_scales: scales(w3),
      rope_half: rope ? rope.headDim / 2 : 0,
      rope_T: rope?.T ?? 0,
      rope_pos0: rope?.pos0 ?? 0,
      rope_scaling: rope?.scaling ?? 1,
      a3_off: at(extra?.a),
      K4,
      a4_off: at(extra?.third?.a),
      w4_scales: scales(extra?.third?.w),
      a2_off: at(lowRank?.a2),
      b2_off: at(lowRank?.b2),
      K2b,
      a2b_off: at(lr2?.a2),
      b2b_off: at(lr2?.b2),
      alpha2b: lr2?.alpha2 ?? 0,
      K2c,
      a2c_off: at(lr3?.a2),
      b2c_off: at(lr3?.b2),
      alpha2c: lr3?.alpha2 ?? 0,
      ce_start: dlogits?.start ?? 0,
      ce_vocab: dlogits?.vocab ?? 0,
    }),
  });
}

/** One of planQkvMatmul's projections: its weight (out×in, any storage format), where it writes
 * (f32, M×out) and its LoRA term scale·h·Bᵀ, if any (h M×r, B out×r, f32). */
export interface QkvProjection {
  readonly w: Tensor;
  readonly out: Tensor;
  readonly lora?: { readonly h: Tensor; readonly b: Tensor; readonly scale: number };
}

/**
 * Plans the attention block's q, k and v projections of one input `a` as one dispatch
 * (matmul.wgsl's matmul_qkv): each workgroup computes a tile of one of them, so the three cost one
 * dispatch instead of two or three, and on a GPU fill more of it. Any of them may carry a LoRA term
 * with h computed before (their h places of one buffer, their B of another, as the trainer keeps
 * them); q, k and v are places of one buffer; `rope` rotates q and k as they are stored.
 * Needs the tiled kernel (more than MATVEC_MAX_ROWS rows), widths that are multiples of 4 (the
 * tile narrows until each is a whole number of its columns) and k and v no wider than q. `tileMath`
 * 'f16' (every weight stored below f32, as f16TileMathApplies) stages A and the weights in f16 and
 * reads and multiplies the LoRA terms in f32 (matmul.wgsl's low_rank_direct_term).
 */
export async function planQkvMatmul(
  ctx: GpuContext,
  a: Tensor,
  projections: { readonly q: QkvProjection; readonly k: QkvProjection; readonly v: QkvProjection },
  opts: {
    readonly rope?: Omit<MatmulRope, 'c' | 'second'>;
    readonly label?: string;
    readonly tileMath?: TileMath;
  } = {},
): Promise<Dispatch> {
  const { q, k, v } = projections;
  const all = [q, k, v];
  const dims = all.map((pr) => matmulDims(a, pr.w, pr.out, { label: opts.label }));
  const [dq, dk, dv] = dims as [MatmulDims, MatmulDims, MatmulDims];
  const label = opts.label ?? `matmul_qkv ${dq.M}x(${dq.N}+${dk.N}+${dv.N})x${dq.K}`;
  checkTiled(ctx, label, dq, {}, 'q, k and v in one dispatch');
  if (dk.N > dq.N || dv.N > dq.N)
    throw new ShapeError(`${label}: k (${dk.N}) and v (${dv.N}) may be no wider than q (${dq.N})`);
  const tile = qkvTile(ctx, dq.M, [dq.N, dk.N, dv.N]);
  if (!tile) throw new ShapeError(`${label}: q, k and v must be multiples of 4 wide (${dq.N}, ${dk.N}, ${dv.N})`);
  const tn = 4 * tile.wgX;
  const tiles = opts.tileMath ?? 'f32';
  if (tiles === 'f16' && !all.every((pr) => f16TileMathApplies(ctx, pr.w)))
    throw new ShapeError(
      `${label}: f16 tile math needs shader-f16 and q, k and v's weights stored below f32 (f16TileMathApplies)`,
    );
  const adapted = all.flatMap((pr, i) => (pr.lora ? [{ i, ...pr.lora }] : []));
  for (const x of adapted) {
    const { h, b } = x;
    const r = h.shape[h.shape.length - 1] as number;
    const n = (dims[x.i] as MatmulDims).N;
    if (
      h.dtype !== 'f32' ||
      b.dtype !== 'f32' ||
      h.size !== dq.M * r ||
      b.shape.length !== 2 ||
      b.shape[0] !== n ||
      b.shape[1] !== r
    )
      throw new ShapeError(
        `${label}: LoRA h ${h.label} ${formatShape(h.shape)} and B ${b.label} ${formatShape(b.shape)} must be f32 ${dq.M}×r and ${n}×r`,
      );
  }
  const rope = opts.rope;
  if (rope) {
    for (const d of dims) checkRope(ctx, label, d, true, {}, { ...rope, c: true, second: false });
    const storage = ctx.limits.maxStorageBuffersPerShaderStage;
    if (storage < 8) throw new LimitExceededError('maxStorageBuffersPerShaderStage', 8, storage, `${label} (RoPE)`);
  }
  const out = placeSpan(ctx, label, 'q, k and v', [q.out, k.out, v.out]);
  // The kernel writes all three: places that share an element would race.
  const byStart = [q.out, k.out, v.out].sort((x, y) => x.byteOffset - y.byteOffset);
  for (const [i, t] of byStart.slice(1).entries()) {
    const before = byStart[i] as Tensor;
    if (t.byteOffset < before.byteOffset + before.size * 4)
      throw new ShapeError(`${label}: q, k and v must not overlap, and ${t.label} starts inside ${before.label}`);
  }
  const [first, second, third] = adapted;
  const hs =
    first &&
    placeSpan(
      ctx,
      label,
      'the LoRA h',
      adapted.map((x) => x.h),
    );
  const bs =
    first &&
    placeSpan(
      ctx,
      label,
      'the LoRA B',
      adapted.map((x) => x.b),
    );
  const at = (span: typeof hs, t: Tensor | undefined) => (span && t ? span.at(t) : 0);
  const ranks = adapted.map((x) => x.h.shape[x.h.shape.length - 1] as number);
  const kernel = await getKernel(ctx, spec(ctx, rope ? MATMUL_QKV_ROPE : MATMUL_QKV, tiles), {
    WG_X: tile.wgX,
    WG_Y: tile.wgY,
    TK: tile.tk,
    TRANS_W: true,
    ...storageFormat('W', q.w),
    ...storageFormat('W3', k.w),
    ...storageFormat('W4', v.w),
    ALIGNED: dq.K % 4 === 0,
    ALIGNED3: dq.K % 4 === 0,
    ALIGNED_LR:
      adapted.length > 0 &&
      ranks.every((r) => r % 4 === 0) &&
      adapted.every((x) => at(hs, x.h) % 4 === 0 && at(bs, x.b) % 4 === 0),
    ROPE: rope ? 3 : 0,
    ...(tiles === 'f16' && adapted.length > 0 ? { LR_DIRECT: true } : {}),
  });
  const placeholder = ctx.placeholder();
  const scales = (t: Tensor) => (isQuantFormat(t.dtype) ? gpuQuantLayout(t.dtype, t.size).scaleWordOffset : 0);
  return bindKernel(ctx, kernel, {
    label,
    resources: [
      a,
      q.w,
      hs?.resource ?? placeholder,
      bs?.resource ?? placeholder,
      out.resource,
      k.w,
      ...(rope ? [rope.invFreq] : []),
      v.w,
    ],
    workgroups: [(dq.N + dk.N + dv.N) / tn, Math.ceil(dq.M / (4 * tile.wgY))],
    uniforms: matmulParams({
      M: dq.M,
      N: dq.N,
      K: dq.K,
      w_scales: scales(q.w),
      w3_scales: scales(k.w),
      w4_scales: scales(v.w),
      K2: ranks[0] ?? 0,
      alpha2: first?.scale ?? 0,
      a2_off: at(hs, first?.h),
      b2_off: at(bs, first?.b),
      K2b: ranks[1] ?? 0,
      alpha2b: second?.scale ?? 0,
      a2b_off: at(hs, second?.h),
      b2b_off: at(bs, second?.b),
      K2c: ranks[2] ?? 0,
      alpha2c: third?.scale ?? 0,
      a2c_off: at(hs, third?.h),
      b2c_off: at(bs, third?.b),
      rope_half: rope ? rope.headDim / 2 : 0,
      rope_T: rope?.T ?? 0,
      rope_pos0: rope?.pos0 ?? 0,
      rope_scaling: rope?.scaling ?? 1,
      qkv_nk: dk.N,
      qkv_nv: dv.N,
      qkv_q_off: out.at(q.out),
      qkv_k_off: out.at(k.out),
      qkv_v_off: out.at(v.out),
      qkv_lr: adapted.reduce((bits, x, j) => bits | ((j + 1) << (2 * x.i)), 0),
    }),
  });
}

/** matmul_qkv's tile for `rows` rows of input and projections of these widths: matmulTile's, made
 * narrower where needed until every width is a whole number of its columns (real models' widths
 * are multiples of 64, a whole GPU tile; small test models' need a narrower one). Undefined where
 * a width is not a multiple of 4. */
function qkvTile(ctx: GpuContext, rows: number, widths: readonly number[]): TileConfig | undefined {
  if (widths.some((n) => !Number.isInteger(n) || n < 4 || n % 4 !== 0)) return undefined;
  const tile = matmulTile(ctx, { M: rows, N: Math.min(...widths), K: 1 });
  let wgX = tile.wgX;
  while (widths.some((n) => n % (4 * wgX) !== 0)) wgX /= 2;
  return { ...tile, wgX };
}

/** matmul.wgsl's Params, in order, with their WGSL types. */
const PARAMS = [
  ['M', 'u32'],
  ['N', 'u32'],
  ['K', 'u32'],
  ['K2', 'u32'],
  ['alpha', 'f32'],
  ['alpha2', 'f32'],
  ['beta', 'f32'],
  ['has_bias', 'u32'],
  ['w_off', 'u32'],
  ['w_scales', 'u32'],
  ['K3', 'u32'],
  ['w3_scales', 'u32'],
  ['rope_half', 'u32'],
  ['rope_T', 'u32'],
  ['rope_pos0', 'u32'],
  ['rope_scaling', 'f32'],
  ['a3_off', 'u32'],
  ['K4', 'u32'],
  ['a4_off', 'u32'],
  ['w4_scales', 'u32'],
  ['a2_off', 'u32'],
  ['b2_off', 'u32'],
  ['K2b', 'u32'],
  ['a2b_off', 'u32'],
  ['b2b_off', 'u32'],
  ['alpha2b', 'f32'],
  ['ce_start', 'u32'],
  ['ce_vocab', 'u32'],
  ['qkv_nk', 'u32'],
  ['qkv_nv', 'u32'],
  ['qkv_q_off', 'u32'],
  ['qkv_k_off', 'u32'],
  ['qkv_v_off', 'u32'],
  ['qkv_lr', 'u32'],
  ['K2c', 'u32'],
  ['a2c_off', 'u32'],
  ['b2c_off', 'u32'],
  ['alpha2c', 'f32'],
] as const;

type MatmulParams = { readonly [F in (typeof PARAMS)[number][0]]?: number };

/** The uniform block of one matmul.wgsl dispatch: the fields given, 0 for the rest (alpha and
 * rope_scaling 1 unless given). */
function matmulParams(values: MatmulParams): ArrayBuffer {
  const defaults: MatmulParams = { alpha: 1, rope_scaling: 1 };
  return packUniforms(PARAMS.map(([name, type]) => [type, values[name] ?? defaults[name] ?? 0]));
}

/** The storage formats a matmul weight (W or W3) may have. */
function isWeightDType(dtype: DType): boolean {
  return dtype === 'f32' || dtype === 'f16' || isQuantFormat(dtype);
}

/** matmul.wgsl's format overrides of a weight operand (`W` or `W3`): f32 when none is set. */
function storageFormat(operand: 'W' | 'W3' | 'W4', t: Tensor): Record<string, boolean> {
  return {
    [`${operand}_F16`]: t.dtype === 'f16',
    [`${operand}_Q8_0`]: t.dtype === 'q8_0',
    [`${operand}_Q4_0`]: t.dtype === 'q4_0',
  };
}

/** Checks matmul_sum's second product against C = A·opW(W) and returns its K3. */
function checkExtra(
  label: string,
  dims: MatmulDims,
  transW: boolean,
  extra: NonNullable<MatmulOptions['extra']>,
  opts: MatmulOptions,
): number {
  if (opts.activation || opts.activationBackward || opts.glu || opts.second)
    throw new ShapeError(`${label}: a second product takes no activation epilogue`);
  const { a: a3, w: w3 } = extra;
  if (w3.shape.length !== 2 || !isWeightDType(w3.dtype))
    throw new ShapeError(`${label}: W3 ${w3.label} ${w3.dtype}${formatShape(w3.shape)} must be a 2-D weight`);
  const K3 = (transW ? w3.shape[1] : w3.shape[0]) as number;
  const N3 = transW ? w3.shape[0] : w3.shape[1];
  if (N3 !== dims.N)
    throw new ShapeError(`${label}: W3 ${w3.label} ${formatShape(w3.shape)} must give ${dims.N} output columns like W`);
  if (a3.dtype !== 'f32' || a3.size !== dims.M * K3 || a3.shape[a3.shape.length - 1] !== K3)
    throw new ShapeError(`${label}: A3 ${a3.label} ${a3.dtype}${formatShape(a3.shape)} must be f32 ${dims.M}×${K3}`);
  return K3;
}

/**
 * Checks matmul_sum_lr's third product and second low-rank term (either may be absent): places of
 * the first's buffers (placeSpan binds each pair as one range); returns K4 (0 without a third
 * product).
 */
function checkSumLr(label: string, dims: MatmulDims, transW: boolean, opts: MatmulOptions): number {
  const extra = opts.extra;
  const lowRank = opts.lowRank;
  if (!extra) throw new ShapeError(`${label}: a third product or a second low-rank term needs \`extra\` (matmul_sum)`);
  if (opts.bias) throw new ShapeError(`${label}: matmul_sum_lr takes no bias`);
  if (lowRank?.a2From) throw new ShapeError(`${label}: matmul_sum_lr forms no LoRA h (a2From)`);
  let K4 = 0;
  const third = extra.third;
  if (third) {
    K4 = (transW ? third.w.shape[1] : third.w.shape[0]) as number;
    const N4 = transW ? third.w.shape[0] : third.w.shape[1];
    if (third.w.shape.length !== 2 || !isWeightDType(third.w.dtype) || N4 !== dims.N)
      throw new ShapeError(
        `${label}: W4 ${third.w.label} ${third.w.dtype}${formatShape(third.w.shape)} must be a 2-D weight giving ${dims.N} columns like W`,
      );
    const a4 = third.a;
    if (a4.dtype !== 'f32' || a4.size !== dims.M * K4 || a4.shape[a4.shape.length - 1] !== K4)
      throw new ShapeError(`${label}: A4 ${a4.label} ${a4.dtype}${formatShape(a4.shape)} must be f32 ${dims.M}×${K4}`);
    if (a4.buffer !== extra.a.buffer)
      throw new ShapeError(`${label}: A4 ${a4.label} must be a place in A3 ${extra.a.label}'s buffer`);
  }
  if (lowRank?.third && !lowRank.second)
    throw new ShapeError(`${label}: a third low-rank term needs a second (lowRank.second)`);
  for (const [which, term] of [
    ['second', lowRank?.second],
    ['third', lowRank?.third],
  ] as const) {
    if (!term || !lowRank) continue;
    const K2b = term.a2.shape[term.a2.shape.length - 1] as number;
    if (term.a2.dtype !== 'f32' || term.a2.size !== dims.M * K2b)
      throw new ShapeError(
        `${label}: the ${which} A2 ${term.a2.label} ${formatShape(term.a2.shape)} must be f32 ${dims.M}×r`,
      );
    const want = transW ? [dims.N, K2b] : [K2b, dims.N];
    const b2 = term.b2;
    if (b2.dtype !== 'f32' || b2.shape.length !== 2 || b2.shape[0] !== want[0] || b2.shape[1] !== want[1])
      throw new ShapeError(
        `${label}: the ${which} B2 ${b2.label} ${formatShape(b2.shape)} must be f32 ${formatShape(want)} to match its A2 and N = ${dims.N}`,
      );
    if (term.a2.buffer !== lowRank.a2.buffer || b2.buffer !== lowRank.b2.buffer)
      throw new ShapeError(
        `${label}: the ${which} low-rank term's operands must be places in the first's buffers (${lowRank.a2.label}, ${lowRank.b2.label})`,
      );
    if (!Number.isFinite(term.alpha2))
      throw new ShapeError(`${label}: the ${which} alpha2 ${term.alpha2} is not finite`);
  }
  return K4;
}

/**
 * The byte range of one buffer that holds these places (tensors at their offsets in it), bound as
 * one operand, and each place's element offset within it. Places start at multiples of the
 * device's minStorageBufferOffsetAlignment (tensorView), so the range's start does too.
 */
function placeSpan(
  ctx: GpuContext,
  label: string,
  what: string,
  places: readonly Tensor[],
): { resource: Resource; holds(t: Tensor): boolean; at(t: Tensor): number } {
  const buffer = (places[0] as Tensor).buffer;
  const stray = places.find((t) => t.buffer !== buffer);
  if (stray)
    throw new ShapeError(
      `${label}: ${what} must be places of one buffer, and ${stray.label} is not in ${(places[0] as Tensor).label}'s`,
    );
  const start = Math.min(...places.map((t) => t.byteOffset));
  const end = Math.max(...places.map((t) => t.byteOffset + t.bindingSize));
  const max = ctx.limits.maxStorageBufferBindingSize;
  if (end - start > max)
    throw new LimitExceededError('maxStorageBufferBindingSize', end - start, max, `${label}: ${what}`);
  return {
    resource: { buffer, offset: start, size: end - start },
    holds: (t) => places.includes(t),
    at: (t) => (t.byteOffset - start) / 4,
  };
}

/** Checks a second projection of A (the gated MLP's up, or matmul_pair's): W3 shaped like W, its
 * outputs f32 like C, and nothing fused that the pair entries lack (only `second` keeps the
 * low-rank term, on C). */
function checkSecondProjection(
  label: string,
  w: Tensor,
  c: Tensor,
  transW: boolean,
  opts: MatmulOptions,
  w3: Tensor,
  outputs: readonly Tensor[],
): void {
  if (!transW || opts.bias || (opts.beta ?? 0) !== 0 || opts.wRows || opts.activation || opts.activationBackward)
    throw new ShapeError(`${label}: a second projection takes W transposed and no bias, beta, row range or epilogue`);
  if (opts.glu && opts.lowRank) throw new ShapeError(`${label}: the gated MLP takes no low-rank term`);
  if (!isWeightDType(w3.dtype) || w3.shape.length !== 2 || w3.shape.some((n, i) => n !== w.shape[i]))
    throw new ShapeError(
      `${label}: the second weight ${w3.label} ${w3.dtype}${formatShape(w3.shape)} must be shaped like W ${formatShape(w.shape)}`,
    );
  for (const t of outputs) {
    if (t.dtype !== 'f32' || t.size !== c.size)
      throw new ShapeError(
        `${label}: ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 like C ${formatShape(c.shape)}`,
      );
  }
}

/** The options that fuse something into a matmul (a term, a prologue or an epilogue). */
const FUSED_OPTIONS = [
  'lowRank',
  'activation',
  'activationBackward',
  'extra',
  'glu',
  'second',
  'rope',
  'norm',
  'residual',
  'normBackward',
  'gluBackward',
  'dlogits',
] as const;

/** Whether `opts` fuses anything but `own`: the prologue entries take nothing else. */
function fusesOtherThan(opts: MatmulOptions, own: (typeof FUSED_OPTIONS)[number]): boolean {
  return FUSED_OPTIONS.some((k) => k !== own && opts[k] !== undefined);
}

/** Checks matmul_glu_bwd's operands: W3 shaped like W, gate and up f32 M×K like A, nothing else
 * fused, f32 tiles, the tiled kernel. */
function checkGluBackward(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  w: Tensor,
  opts: MatmulOptions,
  gb: NonNullable<MatmulOptions['gluBackward']>,
): void {
  if (opts.bias || (opts.beta ?? 0) !== 0 || opts.wRows || fusesOtherThan(opts, 'gluBackward'))
    throw new ShapeError(
      `${label}: the gated MLP's backward prologue takes no bias, beta, row range, low-rank term or other prologue or epilogue`,
    );
  if ((opts.tileMath ?? 'f32') !== 'f32' && !opts.lossScaled)
    throw new ShapeError(`${label}: the gated MLP's backward prologue takes f16 tiles only under a loss scale`);
  checkTiled(ctx, label, dims, opts, "the gated MLP's backward prologue");
  if (!isWeightDType(gb.w3.dtype) || gb.w3.shape.length !== 2 || gb.w3.shape.some((n, i) => n !== w.shape[i]))
    throw new ShapeError(
      `${label}: up's weight ${gb.w3.label} ${gb.w3.dtype}${formatShape(gb.w3.shape)} must be shaped like W ${formatShape(w.shape)}`,
    );
  for (const [t, what] of [
    [gb.gate, 'gate'],
    [gb.up, 'up'],
  ] as const) {
    if (t.dtype !== 'f32' || t.size !== dims.M * dims.K || t.shape[t.shape.length - 1] !== dims.K)
      throw new ShapeError(
        `${label}: ${what} ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 ${dims.M}×${dims.K} like A`,
      );
  }
}

/** Checks matmul_dlogits's operands: labels i32 and lse f32 one per row of A, coef ≥ 3 f32 values,
 * the chunk inside the vocabulary, nothing else fused, f32 tiles, the tiled kernel. */
function checkDlogits(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  opts: MatmulOptions,
  dl: NonNullable<MatmulOptions['dlogits']>,
): void {
  if (opts.bias || fusesOtherThan(opts, 'dlogits'))
    throw new ShapeError(`${label}: the loss's dz prologue takes no bias, low-rank term or other prologue or epilogue`);
  if ((opts.tileMath ?? 'f32') !== 'f32' && !opts.lossScaled)
    throw new ShapeError(`${label}: the loss's dz prologue takes f16 tiles only under a loss scale`);
  checkTiled(ctx, label, dims, opts, "the loss's dz prologue");
  if (dl.labels.dtype !== 'i32' || dl.labels.size !== dims.M)
    throw new ShapeError(`${label}: labels ${dl.labels.label} must be ${dims.M} i32 values, one per row of A`);
  if (dl.lse.dtype !== 'f32' || dl.lse.size !== dims.M)
    throw new ShapeError(`${label}: lse ${dl.lse.label} must be ${dims.M} f32 values, one per row of A`);
  if (dl.coef.dtype !== 'f32' || dl.coef.size < 3)
    throw new ShapeError(
      `${label}: coef ${dl.coef.label} must hold at least 3 f32 values (dz's coefficient in element 2)`,
    );
  if (
    !Number.isSafeInteger(dl.start) ||
    !Number.isSafeInteger(dl.vocab) ||
    dl.start < 0 ||
    dl.start + dims.K > dl.vocab ||
    dl.vocab >= 2 ** 31
  )
    throw new ShapeError(
      `${label}: vocabulary entries [${dl.start}, ${dl.start + dims.K}) are outside a vocabulary of ${dl.vocab}`,
    );
}

/** Refuses `what` (an epilogue or prologue only the tiled kernels have) where planMatmul would take
 * the matrix-vector kernel: MATVEC_MAX_ROWS rows or fewer. */
function checkTiled(ctx: GpuContext, label: string, dims: MatmulDims, opts: MatmulOptions, what: string): void {
  if (usesMatvec(ctx, dims, opts.transW ?? true, opts.matvecVariant ?? matvecVariant(ctx)))
    throw new ShapeError(`${label}: ${what} needs the tiled kernel, more than ${MATVEC_MAX_ROWS} rows (got ${dims.M})`);
}

/** Checks matmul_glu_norm's operands: the gated MLP, enough rows for the tiled kernel, the norm's
 * gain K f32 values, rstd one f32 per row, a finite positive eps. */
function checkNorm(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  opts: MatmulOptions,
  norm: NonNullable<MatmulOptions['norm']>,
): void {
  if (!opts.glu) throw new ShapeError(`${label}: the RMSNorm prologue is for the gated MLP (glu) only`);
  checkTiled(ctx, label, dims, opts, 'the RMSNorm prologue');
  if (norm.w.dtype !== 'f32' || norm.w.size !== dims.K)
    throw new ShapeError(
      `${label}: the norm's gain ${norm.w.label} ${norm.w.dtype}${formatShape(norm.w.shape)} must be ${dims.K} f32 values`,
    );
  if (norm.rstd.dtype !== 'f32' || norm.rstd.size !== dims.M)
    throw new ShapeError(
      `${label}: rstd ${norm.rstd.label} ${norm.rstd.dtype}${formatShape(norm.rstd.shape)} must be ${dims.M} f32 values`,
    );
  if (!(norm.eps > 0) || !Number.isFinite(norm.eps))
    throw new ShapeError(`${label}: the norm's eps ${norm.eps} must be a positive number`);
}

/** matmul_lora_h's row stride of h in workgroup memory: the rank rounded up to 4 (H_R). */
function loraHStride(rank: number): number {
  return Math.ceil(rank / 4) * 4;
}

/** Checks matmul_lora_h's operands: LoRA's A K2×K f32, a rank whose h fits in workgroup memory
 * beside the tiles, the tiled kernel with W transposed, no epilogue but bias, beta and RoPE. */
function checkLoraH(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  opts: MatmulOptions,
  a2From: Tensor,
  rank: number,
): void {
  if (
    !(opts.transW ?? true) ||
    opts.wRows ||
    opts.activation ||
    opts.activationBackward ||
    opts.extra ||
    opts.glu ||
    opts.second ||
    opts.norm ||
    opts.residual
  )
    throw new ShapeError(
      `${label}: LoRA's h in the dispatch takes W transposed, no row range, and no epilogue but bias, beta or RoPE on C`,
    );
  checkTiled(ctx, label, dims, opts, "LoRA's h in the dispatch");
  if (a2From.dtype !== 'f32' || a2From.shape.length !== 2 || a2From.shape[0] !== rank || a2From.shape[1] !== dims.K)
    throw new ShapeError(
      `${label}: LoRA's A ${a2From.label} ${a2From.dtype}${formatShape(a2From.shape)} must be f32 ${rank}×${dims.K}`,
    );
  if (rank > LORA_H_MAX_RANK)
    throw new ShapeError(`${label}: LoRA's h in the dispatch takes ranks up to ${LORA_H_MAX_RANK}, got ${rank}`);
  const tile = matmulTile(ctx, dims);
  // + h_ws (4·WG_Y rows of H_R f32) and la_tile (H_R rows of TK f32)
  const bytes = tileBytes(tile) + 4 * loraHStride(rank) * (4 * tile.wgY + tile.tk);
  const have = ctx.limits.maxComputeWorkgroupStorageSize;
  if (bytes > have)
    throw new LimitExceededError('maxComputeWorkgroupStorageSize', bytes, have, `${label} (LoRA's h in the dispatch)`);
}

/** Checks matmul_norm_bwd's operands: dn, x and d_mid M×K f32 (d_mid apart from what is read),
 * the gain K and rstd M f32 values, f32 tiles, the tiled kernel, nothing else fused. */
function checkNormBackward(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  a: Tensor,
  c: Tensor,
  opts: MatmulOptions,
  nb: NonNullable<MatmulOptions['normBackward']>,
): void {
  if (opts.bias || (opts.beta ?? 0) !== 0 || opts.wRows || fusesOtherThan(opts, 'normBackward'))
    throw new ShapeError(
      `${label}: the norm's backward prologue takes no bias, beta, row range, low-rank term or epilogue`,
    );
  if ((opts.tileMath ?? 'f32') !== 'f32' && !opts.lossScaled)
    throw new ShapeError(`${label}: the norm's backward prologue takes f16 tiles only under a loss scale`);
  checkTiled(ctx, label, dims, opts, "the norm's backward prologue");
  const rowsLikeA = (t: Tensor, what: string) => {
    if (t.dtype !== 'f32' || t.size !== dims.M * dims.K || t.shape[t.shape.length - 1] !== dims.K)
      throw new ShapeError(
        `${label}: ${what} ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 ${dims.M}×${dims.K} like A`,
      );
  };
  rowsLikeA(nb.dn, "the norm's output gradient");
  rowsLikeA(nb.x, "the norm's input");
  rowsLikeA(nb.dMid, 'd_mid');
  if (nb.w.dtype !== 'f32' || nb.w.size !== dims.K)
    throw new ShapeError(`${label}: the norm's gain ${nb.w.label} must be ${dims.K} f32 values`);
  if (nb.rstd.dtype !== 'f32' || nb.rstd.size !== dims.M)
    throw new ShapeError(`${label}: rstd ${nb.rstd.label} must be ${dims.M} f32 values`);
  // The dispatch reads A, dn and x while its first column of workgroups writes d_mid, and C is
  // written beside it: refused here by name (bindKernel would refuse a written buffer bound twice
  // too, without saying which operand).
  for (const [t, how] of [
    [a, 'reads'],
    [nb.dn, 'reads'],
    [nb.x, 'reads'],
    [c, 'writes'],
  ] as const)
    if (t.buffer === nb.dMid.buffer)
      throw new ShapeError(`${label}: d_mid ${nb.dMid.label} must be another buffer than ${t.label}, which it ${how}`);
}

/** Checks matmul_resid's residual: M×N f32 like C, the tiled kernel, nothing else in the store. */
function checkResidual(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  c: Tensor,
  opts: MatmulOptions,
  residual: Tensor,
): void {
  if (
    (opts.beta ?? 0) !== 0 ||
    opts.activation ||
    opts.activationBackward ||
    opts.extra ||
    opts.glu ||
    opts.second ||
    opts.rope
  )
    throw new ShapeError(`${label}: a residual takes no beta or other epilogue`);
  checkTiled(ctx, label, dims, opts, 'a residual');
  if (residual.dtype !== 'f32' || residual.size !== c.size)
    throw new ShapeError(
      `${label}: the residual ${residual.label} ${residual.dtype}${formatShape(residual.shape)} must be f32 like C ${formatShape(c.shape)}`,
    );
}

/** Checks the RoPE epilogue against the product: whole heads of an even half, the frequencies,
 * positions that f32 holds exactly, nothing else fused that its entries lack. */
function checkRope(
  ctx: GpuContext,
  label: string,
  dims: MatmulDims,
  transW: boolean,
  opts: MatmulOptions,
  rope: MatmulRope,
): void {
  if (
    !transW ||
    (opts.beta ?? 0) !== 0 ||
    opts.wRows ||
    opts.activation ||
    opts.activationBackward ||
    opts.glu ||
    opts.extra
  )
    throw new ShapeError(`${label}: the RoPE epilogue takes W transposed and no beta, row range or other epilogue`);
  const { headDim, T } = rope;
  if (!Number.isInteger(headDim) || headDim < 4 || headDim % 4 !== 0 || dims.N % headDim !== 0)
    throw new ShapeError(
      `${label}: the RoPE epilogue needs a head size that is a multiple of 4 and divides N = ${dims.N}, got ${headDim}`,
    );
  if (rope.invFreq.dtype !== 'f32' || rope.invFreq.size !== headDim / 2)
    throw new ShapeError(`${label}: RoPE inv_freq ${rope.invFreq.label} must be ${headDim / 2} f32 values`);
  const pos0 = rope.pos0 ?? 0;
  if (!Number.isInteger(T) || T < 1 || !Number.isInteger(pos0) || pos0 < 0 || pos0 + T > 2 ** 24)
    throw new ShapeError(`${label}: RoPE positions ${pos0} + row % ${T} must be whole and below 2^24`);
  if (dims.M % T !== 0)
    throw new ShapeError(`${label}: RoPE over sequences of ${T} needs a whole number of them, got ${dims.M} rows`);
  if (!Number.isFinite(rope.scaling ?? 1))
    throw new ShapeError(`${label}: RoPE scaling ${rope.scaling} must be finite`);
  if (!rope.c && !rope.second) throw new ShapeError(`${label}: the RoPE epilogue rotates neither output`);
  if (rope.second && !opts.second) throw new ShapeError(`${label}: RoPE on the second output needs \`second\``);
  const storage = ctx.limits.maxStorageBuffersPerShaderStage;
  const needed = opts.second || opts.lowRank?.a2From ? 8 : 7;
  if (storage < needed)
    throw new LimitExceededError('maxStorageBuffersPerShaderStage', needed, storage, `${label} (RoPE epilogue)`);
}

/** Checks an activation epilogue's operands: each M×N f32 like C, and what the kernel needs. */
function checkActivation(ctx: GpuContext, label: string, c: Tensor, opts: MatmulOptions): void {
  const act = opts.activation;
  const bwd = opts.activationBackward;
  if (!act && !bwd) return;
  if (act && bwd) throw new ShapeError(`${label}: activation and activationBackward are exclusive`);
  const storage = ctx.limits.maxStorageBuffersPerShaderStage;
  if (storage < 8)
    throw new LimitExceededError('maxStorageBuffersPerShaderStage', 8, storage, `${label} (activation epilogue)`);
  const like = (t: Tensor, what: string) => {
    if (t.dtype !== 'f32' || t.size !== c.size) {
      throw new ShapeError(
        `${label}: ${what} ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 like C ${formatShape(c.shape)}`,
      );
    }
  };
  if (act) {
    like(act.act, 'activation');
    if (act.kind === 'silu_mul') like(act.gate, 'gate');
    return;
  }
  if (bwd) {
    if (opts.bias || (opts.beta ?? 0) !== 0) throw new ShapeError(`${label}: activationBackward takes no bias or beta`);
    if (bwd.kind === 'silu_mul') {
      like(bwd.gate, 'gate');
      like(bwd.up, 'up');
      like(bwd.dup, 'dup');
    } else like(bwd.pre, 'pre-activation');
  }
}

/** FLOPs of C = A·opW(W) (+ the low-rank term), counting a multiply-add as 2. */
export function matmulFlops(dims: MatmulDims, rank = 0): number {
  return 2 * dims.M * dims.N * (dims.K + rank);
}
