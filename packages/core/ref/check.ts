/**
 * Comparison and gradient-checking helpers shared by every kernel test.
 */
import { roundToF16 } from '../src/f16.js';
import { isQuantFormat, roundThrough } from '../src/quant.js';
import { seededRandom } from '../src/random.js';
import type { DType } from '../src/tensor.js';

export interface Comparison {
  ok: boolean;
  maxAbs: number;
  maxRel: number;
  /** Index of the worst violation of atol + rtol·|ref| (or of the largest error when all pass). */
  worst: number;
  mismatches: number;
  count: number;
  summary: string;
}

/**
 * The largest absolute difference relative to the largest magnitude of `want` (the absolute
 * difference when `want` is all zeros): how the model tests compare whole gradient matrices and
 * logits with PEFT's and transformers', where elementwise relative error means nothing at zeros.
 */
export function maxRelError(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < want.length; i++) {
    num = Math.max(num, Math.abs((got[i] as number) - (want[i] as number)));
    den = Math.max(den, Math.abs(want[i] as number));
  }
  return den === 0 ? num : num / den;
}

/** Elementwise |actual − expected| ≤ atol + rtol·|expected|; NaN anywhere is a mismatch. */
export function compare(
  name: string,
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  atol: number,
  rtol: number,
): Comparison {
  if (actual.length !== expected.length) {
    return {
      ok: false,
      maxAbs: Infinity,
      maxRel: Infinity,
      worst: -1,
      mismatches: Math.max(actual.length, expected.length),
      count: expected.length,
      summary: `${name}: length ${actual.length} != expected ${expected.length}`,
    };
  }
  let maxAbs = 0;
  let maxRel = 0;
  let worst = -1;
  let worstExcess = -Infinity;
  let mismatches = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i] as number;
    const a = actual[i] as number;
    const abs = Math.abs(a - e);
    const rel = abs / Math.max(Math.abs(e), 1e-30);
    const bound = atol + rtol * Math.abs(e);
    const bad = !(abs <= bound); // catches NaN
    if (bad) mismatches++;
    if (Number.isNaN(abs) || abs > maxAbs) maxAbs = Number.isNaN(abs) ? Number.NaN : abs;
    if (abs > atol && rel > maxRel) maxRel = rel;
    const excess = Number.isNaN(abs) ? Infinity : abs - bound;
    if (excess > worstExcess) {
      worstExcess = excess;
      worst = i;
    }
  }
  const ok = mismatches === 0;
  const w = worst >= 0 ? ` worst [${worst}] got ${actual[worst]} want ${expected[worst]}` : '';
  return {
    ok,
    maxAbs,
    maxRel,
    worst,
    mismatches,
    count: expected.length,
    summary: `${name}: ${ok ? 'ok' : `${mismatches}/${expected.length} outside ${atol} + ${rtol}·|ref|`} max abs ${maxAbs.toExponential(2)} max rel ${maxRel.toExponential(2)}${ok ? '' : w}`,
  };
}

/** Central finite difference of f at each coordinate of `params` (perturbed in place and restored). */
export function finiteDifference(
  f: () => number,
  params: Float64Array,
  eps = 1e-6,
  indices?: readonly number[],
): Float64Array {
  const idx = indices ?? [...params.keys()];
  const grad = new Float64Array(params.length);
  for (const i of idx) {
    const orig = params[i] as number;
    params[i] = orig + eps;
    const up = f();
    params[i] = orig - eps;
    const down = f();
    params[i] = orig;
    grad[i] = (up - down) / (2 * eps);
  }
  return grad;
}

/** The seeded generator every test input comes from (mulberry32, see src/random.ts). */
export const rng = seededRandom;

/** n values uniform in [-scale, scale). */
export function randomArray(n: number, seed: number, scale = 1): Float64Array {
  const next = rng(seed);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = (2 * next() - 1) * scale;
  return out;
}

/** The values a weight of `dtype` holds once stored (f16 rounding, or quantized and dequantized). */
export function asStored(w: Float64Array, dtype: DType): Float64Array {
  if (dtype === 'f16') return Float64Array.from(roundToF16(w));
  if (isQuantFormat(dtype)) return Float64Array.from(roundThrough(dtype, w));
  return w;
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += (a[i] as number) * (b[i] as number);
  return s;
}
