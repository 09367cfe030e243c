/**
 * LoRA dropout's mask, computed on the CPU from the same counters as shaders/dropout.wgsl (written
 * independently of it): keep(i) = hash(seed, step, micro, module, i) ≥ round(p · 2^32), hash a
 * chain of lowbias32 mixes. The reference for the kernel and for the LoRA gradients with dropout.
 */

function mix32(v: number): number {
  let h = v >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  h ^= h >>> 16;
  return h >>> 0;
}

export interface DropoutCounter {
  readonly seed: number;
  readonly step: number;
  readonly micro: number;
  readonly module: number;
}

/** The drop threshold for probability p (a u32). */
export function dropoutThreshold(p: number): number {
  return Math.min(2 ** 32 - 1, Math.round(p * 2 ** 32));
}

/** keep[i] for i < n: 1 where the element is kept, 0 where it is dropped. */
export function dropoutMaskRef(c: DropoutCounter, p: number, n: number): Uint8Array {
  const threshold = dropoutThreshold(p);
  let h = mix32((c.seed ^ 0x9e3779b9) >>> 0);
  h = mix32((h ^ c.step) >>> 0);
  h = mix32((h ^ c.micro) >>> 0);
  h = mix32((h ^ c.module) >>> 0);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = mix32((h ^ i) >>> 0) >= threshold ? 1 : 0;
  return out;
}

/** y = beta·y + alpha·keep·x/(1 − p), in float64. */
export function dropoutRef(
  x: ArrayLike<number>,
  keep: Uint8Array,
  p: number,
  alpha = 1,
  beta = 0,
  y0?: ArrayLike<number>,
): Float64Array {
  const out = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    out[i] = (keep[i] ? (alpha * (x[i] as number)) / (1 - p) : 0) + (beta !== 0 && y0 ? beta * (y0[i] as number) : 0);
  }
  return out;
}
