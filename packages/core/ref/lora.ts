/**
 * Float64 reference of one LoRA linear layer, forward and backward, from the definition
 *   y = x·W0ᵀ + s·(xd·Aᵀ)·Bᵀ + bias,   xd = x, or with dropout xd = keep·x/(1 − p)
 * with x (T×in), W0 (out×in), A (r×in), B (out×r), keep a fixed 0/1 mask. Loops, no tiling, no
 * fusion.
 */
import { matmulRef } from './matmul.js';

export interface LoraRefInput {
  T: number;
  inF: number;
  outF: number;
  r: number;
  x: ArrayLike<number>;
  w0: ArrayLike<number>;
  a: ArrayLike<number>;
  b: ArrayLike<number>;
  bias?: ArrayLike<number>;
  scale: number;
  /** LoRA dropout on the branch's input: keep[i] ∈ {0, 1} per element of x, probability p. */
  dropout?: { keep: ArrayLike<number>; p: number };
}

/** The LoRA branch's input: x, or keep·x/(1 − p). */
function branchInput(p: LoraRefInput): ArrayLike<number> {
  const d = p.dropout;
  if (!d) return p.x;
  return Float64Array.from(p.x, (v, i) => ((d.keep[i] as number) ? v / (1 - d.p) : 0));
}

export function loraForwardRef(p: LoraRefInput): { y: Float64Array; h: Float64Array } {
  const { T, inF, outF, r } = p;
  const xd = branchInput(p);
  const h = new Float64Array(T * r);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < r; j++) {
      let sum = 0;
      for (let i = 0; i < inF; i++) sum += (xd[t * inF + i] as number) * (p.a[j * inF + i] as number);
      h[t * r + j] = sum;
    }
  }
  const y = new Float64Array(T * outF);
  for (let t = 0; t < T; t++) {
    for (let o = 0; o < outF; o++) {
      let base = 0;
      for (let i = 0; i < inF; i++) base += (p.x[t * inF + i] as number) * (p.w0[o * inF + i] as number);
      let low = 0;
      for (let j = 0; j < r; j++) low += h[t * r + j] * (p.b[o * r + j] as number);
      y[t * outF + o] = base + p.scale * low + (p.bias ? (p.bias[o] as number) : 0);
    }
  }
  return { y, h };
}

/** Gradients of a scalar loss L given dy = ∂L/∂y. W0 and bias are frozen: no gradient. */
export function loraBackwardRef(
  p: LoraRefInput,
  dy: ArrayLike<number>,
): { dx: Float64Array; da: Float64Array; db: Float64Array } {
  const { T, inF, outF, r, scale } = p;
  const { h } = loraForwardRef(p);
  // ∂L/∂h[t][j] = s·Σ_o dy[t][o]·B[o][j]
  const g = matmulRef(dy, p.b, T, outF, r); // dy·B, T×r (unscaled)
  const db = new Float64Array(outF * r);
  for (let o = 0; o < outF; o++) {
    for (let j = 0; j < r; j++) {
      let sum = 0;
      for (let t = 0; t < T; t++) sum += (dy[t * outF + o] as number) * h[t * r + j];
      db[o * r + j] = scale * sum;
    }
  }
  const xd = branchInput(p);
  const da = new Float64Array(r * inF);
  for (let j = 0; j < r; j++) {
    for (let i = 0; i < inF; i++) {
      let sum = 0;
      for (let t = 0; t < T; t++) sum += g[t * r + j] * (xd[t * inF + i] as number);
      da[j * inF + i] = scale * sum;
    }
  }
  const dx = new Float64Array(T * inF);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < inF; i++) {
      let sum = 0;
      for (let o = 0; o < outF; o++) sum += (dy[t * outF + o] as number) * (p.w0[o * inF + i] as number);
      let low = 0;
      for (let j = 0; j < r; j++) low += g[t * r + j] * (p.a[j * inF + i] as number);
      // ∂xd/∂x = keep/(1 − p) elementwise.
      const d = p.dropout;
      if (d) low = (d.keep[t * inF + i] as number) ? low / (1 - d.p) : 0;
      dx[t * inF + i] = sum + scale * low;
    }
  }
  return { dx, da, db };
}
