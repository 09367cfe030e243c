import ropeSource from '../../../../shaders/rope.wgsl?raw';
import ropeMath from '../../../../shaders/rope_math.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError, WebtuneError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { grid1d } from './elementwise.js';

// cos_sin (shaders/rope_math.wgsl, shared with the attention backward) first.
const source = `${ropeMath}\n${ropeSource}`;

const spec = (entryPoint: 'rope_fwd' | 'rope_bwd' | 'rope_fwd_cache'): KernelSpec => ({
  source,
  file: 'shaders/rope_math.wgsl + shaders/rope.wgsl',
  entryPoint,
  bindings:
    entryPoint === 'rope_fwd_cache'
      ? ['uniform', 'read', 'read', 'write', 'write', 'read', 'write', 'write']
      : ['uniform', 'read', 'read', 'write', 'write'],
});

/** A config.json rope_scaling (transformers 4) / rope_parameters (transformers 5) we implement. */
export type RopeScaling =
  | {
      rope_type: 'llama3';
      factor: number;
      low_freq_factor: number;
      high_freq_factor: number;
      original_max_position_embeddings: number;
    }
  | { rope_type: 'default' };

export interface RopeConfig {
  /** config.head_dim, or hidden_size / num_attention_heads. */
  readonly headDim: number;
  /** config.rope_theta. */
  readonly ropeTheta: number;
  readonly ropeScaling?: RopeScaling | null;
}

export const SUPPORTED_ROPE_TYPES = ['default', 'llama3'] as const;

/** A RoPE configuration webtune cannot reproduce (an unsupported rope_type, bad parameters). */
export class RopeConfigError extends WebtuneError {}

const f = Math.fround;

/**
 * The inverse frequencies [headDim/2] and attention scaling that transformers computes
 * (`compute_default_rope_parameters`, `_compute_llama3_parameters`), reproduced operation by
 * operation in f32 as PyTorch evaluates them: a Python scalar meets an f32 tensor as an f32, and
 * `scalar / tensor` is `tensor.reciprocal() * scalar`.
 */
export function ropeInvFreq(config: RopeConfig): { invFreq: Float32Array; attentionScaling: number } {
  const { headDim, ropeTheta } = config;
  if (!Number.isSafeInteger(headDim) || headDim < 2 || headDim % 2 !== 0) {
    throw new RopeConfigError(`RoPE: head_dim ${headDim} must be a positive even integer`);
  }
  if (!(ropeTheta > 0) || !Number.isFinite(ropeTheta)) {
    throw new RopeConfigError(`RoPE: rope_theta ${ropeTheta} must be a positive number`);
  }
  const half = headDim / 2;
  // inv_freq = 1 / (base ** (arange(0, dim, 2).float() / dim))
  const base = f(ropeTheta);
  const invFreq = new Float32Array(half);
  for (let i = 0; i < half; i++) invFreq[i] = f(1 / f(base ** f((2 * i) / headDim)));

  const scaling = config.ropeScaling ?? { rope_type: 'default' };
  const type = (scaling as { rope_type?: unknown }).rope_type;
  if (type === 'default') return { invFreq, attentionScaling: 1 };
  if (type !== 'llama3') {
    throw new RopeConfigError(
      `RoPE: rope_type ${JSON.stringify(type)} is not supported; supported rope types: ${SUPPORTED_ROPE_TYPES.join(', ')}`,
    );
  }
  const s = scaling as Extract<RopeScaling, { rope_type: 'llama3' }>;
  for (const key of ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'] as const) {
    if (!Number.isFinite(s[key]) || s[key] <= 0) {
      throw new RopeConfigError(`RoPE llama3: ${key} = ${String(s[key])} must be a positive number`);
    }
  }
  if (s.high_freq_factor === s.low_freq_factor) {
    throw new RopeConfigError('RoPE llama3: high_freq_factor must differ from low_freq_factor');
  }
  // Python floats (double precision) in transformers:
  const lowFreqWavelen = s.original_max_position_embeddings / s.low_freq_factor;
  const highFreqWavelen = s.original_max_position_embeddings / s.high_freq_factor;
  const factor = f(s.factor);
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const inv = invFreq[i] as number;
    const wavelen = f(f(1 / inv) * f(2 * Math.PI)); // 2π / inv_freq
    const scaled = wavelen > f(lowFreqWavelen) ? f(inv / factor) : inv; // inv_freq_llama
    // smooth = (old_context_len / wavelen − low) / (high − low)
    const smooth = f(
      f(f(f(1 / wavelen) * f(s.original_max_position_embeddings)) - f(s.low_freq_factor)) /
        f(s.high_freq_factor - s.low_freq_factor),
    );
    // smoothed = (1 − smooth)·inv_freq_llama / factor + smooth·inv_freq_llama
    const smoothed = f(f(f(f(1 - smooth) * scaled) / factor) + f(smooth * scaled));
    const medium = !(wavelen < f(highFreqWavelen)) && !(wavelen > f(lowFreqWavelen));
    out[i] = medium ? smoothed : scaled;
  }
  return { invFreq: out, attentionScaling: 1 };
}

export interface RopeOptions {
  readonly nHeads: number;
  readonly headDim: number;
  /** Tokens per sequence: row r is at position pos0 + r % T. Default: every row (B = 1). */
  readonly T?: number;
  /** Position of each sequence's first row. Default 0. */
  readonly pos0?: number;
  /** [rows] i32 positions, replacing pos0 + r % T (packed sequences, decoding). */
  readonly positions?: Tensor;
  /** Elements from one row to the next. Default nHeads·headDim. */
  readonly rowStride?: number;
  /** Column where the first head starts. Default 0. */
  readonly colOffset?: number;
  /** HF's attention_scaling, multiplying cos and sin. Default 1 (default and llama3 RoPE). */
  readonly attentionScaling?: number;
  /**
   * A second tensor rotated by the same dispatch (k beside q): `nHeads` packed heads per row, at
   * the same positions. A separate buffer from x.
   */
  readonly with?: { readonly x: Tensor; readonly nHeads: number };
  /**
   * Decoding (forward only, with `with` and `positions`): `with`'s rotated rows go to row
   * positions[row] of `k` instead of back in place, and the same rows of `v` to `vCache`'s: the
   * new token's keys and values enter the KV cache in this dispatch. `maxRow` is the largest
   * position planned for.
   */
  readonly cache?: { readonly v: Tensor; readonly k: Tensor; readonly vCache: Tensor; readonly maxRow: number };
  readonly label?: string;
}

function uniforms(ctx: GpuContext, op: string, x: Tensor, invFreq: Tensor, o: RopeOptions, wg: number) {
  const { nHeads, headDim } = o;
  if (!Number.isSafeInteger(nHeads) || nHeads < 1) throw new ShapeError(`${op}: nHeads ${nHeads} must be ≥ 1`);
  if (!Number.isSafeInteger(headDim) || headDim < 2 || headDim % 2 !== 0) {
    throw new ShapeError(`${op}: headDim ${headDim} must be a positive even integer`);
  }
  const half = headDim / 2;
  if (x.dtype !== 'f32') throw new ShapeError(`${op}: x ${x.label} must be f32, got ${x.dtype}`);
  if (invFreq.dtype !== 'f32' || invFreq.size !== half) {
    throw new ShapeError(
      `${op}: inv_freq ${invFreq.label} ${invFreq.dtype}${formatShape(invFreq.shape)} must be ${half} f32 values (headDim / 2)`,
    );
  }
  const stride = o.rowStride ?? nHeads * headDim;
  const offset = o.colOffset ?? 0;
  if (
    !Number.isSafeInteger(stride) ||
    !Number.isSafeInteger(offset) ||
    offset < 0 ||
    offset + nHeads * headDim > stride
  ) {
    throw new ShapeError(
      `${op}: ${nHeads} heads of ${headDim} from column ${offset} do not fit a row stride of ${stride}`,
    );
  }
  if (x.size % stride !== 0) {
    throw new ShapeError(`${op}: x ${x.label} ${formatShape(x.shape)} is not a whole number of rows of ${stride}`);
  }
  const rows = x.size / stride;
  const T = o.T ?? rows;
  const pos0 = o.pos0 ?? 0;
  if (o.positions) {
    if (o.positions.dtype !== 'i32' || o.positions.size !== rows) {
      throw new ShapeError(
        `${op}: positions ${o.positions.label} ${o.positions.dtype}${formatShape(o.positions.shape)} must be ${rows} i32 values`,
      );
    }
  } else {
    if (!Number.isSafeInteger(T) || T < 1 || rows % T !== 0) {
      throw new ShapeError(`${op}: T = ${T} must divide the ${rows} rows of x ${formatShape(x.shape)}`);
    }
    // Positions convert to f32 exactly below 2^24.
    if (!Number.isSafeInteger(pos0) || pos0 < 0 || pos0 + T > 2 ** 24) {
      throw new ShapeError(`${op}: pos0 = ${pos0} must be an integer with 0 ≤ pos0 and pos0 + T ≤ 2^24`);
    }
  }
  const scaling = o.attentionScaling ?? 1;
  if (!Number.isFinite(scaling)) throw new ShapeError(`${op}: attentionScaling ${scaling} is not finite`);
  const nHeads2 = o.with?.nHeads ?? 0;
  if (o.with) {
    const x2 = o.with.x;
    if (!Number.isSafeInteger(nHeads2) || nHeads2 < 1)
      throw new ShapeError(`${op}: with.nHeads ${nHeads2} must be ≥ 1`);
    if (x2.dtype !== 'f32' || x2.size !== rows * nHeads2 * headDim) {
      throw new ShapeError(
        `${op}: ${x2.label} ${x2.dtype}${formatShape(x2.shape)} must be f32 [${rows}, ${nHeads2 * headDim}] (${nHeads2} heads of ${headDim} per row of ${x.label})`,
      );
    }
    // Both are written: places of one buffer (an arena) are fine where they do not overlap.
    const overlap =
      x2.buffer === x.buffer &&
      x2.byteOffset < x.byteOffset + x.byteLength &&
      x.byteOffset < x2.byteOffset + x2.byteLength;
    if (overlap) throw new ShapeError(`${op}: ${x2.label} must be another buffer than ${x.label}, or a place apart`);
  }
  if (o.cache) {
    const width = nHeads2 * headDim;
    if (!o.with || !o.positions) throw new ShapeError(`${op}: a KV cache write needs \`with\` (k) and positions`);
    for (const [what, t, size] of [
      ['v', o.cache.v, rows * width],
      ['k cache', o.cache.k, (o.cache.maxRow + 1) * width],
      ['v cache', o.cache.vCache, (o.cache.maxRow + 1) * width],
    ] as const) {
      if (t.dtype !== 'f32' || t.size < size) {
        throw new ShapeError(
          `${op}: ${what} ${t.label} ${t.dtype}${formatShape(t.shape)} must hold ${size} f32 values`,
        );
      }
    }
  }
  const pairs = rows * (nHeads + nHeads2) * half;
  const grid = grid1d(ctx, pairs, wg);
  return {
    workgroups: grid.workgroups,
    data: packUniforms([
      ['u32', pairs],
      ['u32', half],
      ['u32', nHeads],
      ['u32', T],
      ['u32', pos0],
      ['u32', stride],
      ['u32', offset],
      ['f32', scaling],
      ['u32', o.positions ? 1 : 0],
      ['u32', grid.rowStride],
      ['u32', nHeads2],
    ]),
  };
}

async function planRope(
  ctx: GpuContext,
  entry: 'rope_fwd' | 'rope_bwd' | 'rope_fwd_cache',
  x: Tensor,
  invFreq: Tensor,
  opts: RopeOptions,
  label: string,
): Promise<Dispatch> {
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const u = uniforms(ctx, label, x, invFreq, opts, wg);
  const kernel = await getKernel(ctx, spec(entry), { WG: wg });
  return bindKernel(ctx, kernel, {
    label,
    resources: [
      invFreq,
      opts.positions ?? ctx.placeholder(),
      x,
      opts.with?.x ?? ctx.placeholder('write'),
      ...(opts.cache ? [opts.cache.v, opts.cache.k, opts.cache.vCache] : []),
    ],
    workgroups: u.workgroups,
    uniforms: u.data,
  });
}

/** Rotates the heads of x in place (q, k, or both: adjacent in a fused buffer, or k as `with`).
 * One dispatch. */
export function planRopeForward(ctx: GpuContext, x: Tensor, invFreq: Tensor, opts: RopeOptions): Promise<Dispatch> {
  return planRope(ctx, opts.cache ? 'rope_fwd_cache' : 'rope_fwd', x, invFreq, opts, opts.label ?? 'rope');
}

/**
 * The backward of planRopeForward: applies the transposed rotation to the gradient dx in place
 * (dq/dk after attention's backward). Same options as the forward. One dispatch.
 */
export function planRopeBackward(ctx: GpuContext, dx: Tensor, invFreq: Tensor, opts: RopeOptions): Promise<Dispatch> {
  if (opts.cache) throw new ShapeError(`${opts.label ?? 'rope'}.backward: a KV cache write is forward only`);
  return planRope(ctx, 'rope_bwd', dx, invFreq, opts, `${opts.label ?? 'rope'}.backward`);
}
