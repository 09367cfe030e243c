/**
 * Float64 reference of one optimizer step over a flat list of parameters, from the definitions:
 *
 *   gradient norm    N = sqrt(Σ_i g_i²)                      (over every parameter together)
 *   clipping         c = min(maxNorm / (N + 1e-6), 1);  g ← c·g     (only when maxNorm is set)
 *   AdamW, step t ≥ 1, learning rate lr, weight decay λ:
 *                    p ← p − lr·λ·p                          (decoupled weight decay)
 *                    m ← β1·m + (1 − β1)·g
 *                    v ← β2·v + (1 − β2)·g²
 *                    m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
 *                    p ← p − lr·m̂ / (sqrt(v̂) + eps)
 *
 * as torch.optim.AdamW (amsgrad and maximize off) preceded by torch.nn.utils.clip_grad_norm_.
 * One deliberate difference from torch: when any gradient is NaN or ±Inf, or N overflows, the step
 * is skipped and p, m, v are left as they were (torch would write NaN into them); webtune's
 * trainer then stops with an error and keeps the last good adapter.
 */
import { randomArray } from './check.js';

export interface AdamWRefHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Clip the total gradient norm to this; undefined (or ≤ 0) = no clipping. */
  maxNorm?: number;
}

export interface AdamWRefState {
  param: Float64Array;
  m: Float64Array;
  v: Float64Array;
}

/** L2 norm of all values together, and whether every value is finite. Non-finite values are
 * left out of the sum, so `norm` is the norm of the finite ones. */
export function gradNormRef(g: ArrayLike<number>): { norm: number; finite: boolean; nonFinite: number } {
  let sum = 0;
  let nonFinite = 0;
  for (let i = 0; i < g.length; i++) {
    const x = g[i] as number;
    if (Number.isFinite(x)) sum += x * x;
    else nonFinite++;
  }
  const norm = Math.sqrt(sum);
  return { norm, finite: nonFinite === 0 && Number.isFinite(norm), nonFinite };
}

/** The factor clip_grad_norm_ multiplies the gradients by. */
export function clipCoefRef(norm: number, maxNorm: number | undefined): number {
  if (maxNorm === undefined || maxNorm <= 0) return 1;
  return Math.min(maxNorm / (norm + 1e-6), 1);
}

/**
 * One step t (1-based) in place on `state`. Returns the gradient norm before clipping, the clip
 * coefficient and whether the step was applied.
 */
export function adamwStepRef(
  state: AdamWRefState,
  grad: ArrayLike<number>,
  h: AdamWRefHyper,
  t: number,
): { norm: number; coef: number; applied: boolean } {
  const n = state.param.length;
  if (grad.length !== n || state.m.length !== n || state.v.length !== n) {
    throw new Error(
      `adamwStepRef: lengths differ (param ${n}, grad ${grad.length}, m ${state.m.length}, v ${state.v.length})`,
    );
  }
  const { norm, finite } = gradNormRef(grad);
  const coef = clipCoefRef(norm, h.maxNorm);
  if (!finite) return { norm, coef, applied: false };
  const bc1 = 1 - h.beta1 ** t;
  const bc2 = 1 - h.beta2 ** t;
  for (let i = 0; i < n; i++) {
    const g = coef * (grad[i] as number);
    let p = state.param[i] as number;
    p -= h.lr * h.weightDecay * p;
    const m = h.beta1 * (state.m[i] as number) + (1 - h.beta1) * g;
    const v = h.beta2 * (state.v[i] as number) + (1 - h.beta2) * g * g;
    const mHat = m / bc1;
    const vHat = v / bc2;
    p -= (h.lr * mHat) / (Math.sqrt(vHat) + h.eps);
    state.param[i] = p;
    state.m[i] = m;
    state.v[i] = v;
  }
  return { norm, coef, applied: true };
}

/**
 * The inputs of one golden optimizer case (tools/golden_optim.py draws the same numbers): the
 * initial parameters and each step's gradients, tensors concatenated, every value an f32.
 */
export function adamwGoldenInputs(c: {
  sizes: readonly number[];
  initSeed: number;
  initScale: number;
  gradSeed: number;
  gradScales: readonly number[];
}): { param: Float64Array; grads: Float64Array[] } {
  const f32 = (a: Float64Array) => a.map((x) => Math.fround(x));
  const concat = (parts: Float64Array[]) => {
    const out = new Float64Array(parts.reduce((s, p) => s + p.length, 0));
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  };
  const param = concat(c.sizes.map((n, i) => f32(randomArray(n, c.initSeed + i, c.initScale))));
  const grads = c.gradScales.map((scale, s) =>
    concat(c.sizes.map((n, i) => f32(randomArray(n, c.gradSeed + 1000 * (s + 1) + i, scale)))),
  );
  return { param, grads };
}
