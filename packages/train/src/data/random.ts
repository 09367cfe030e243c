/**
 * The data order: a shuffle that is the same in every browser and in Node and can be recomputed
 * from (seed, epoch) alone when training resumes. The generator is the trainer's Rng
 * (xoshiro128**), on its own stream per epoch.
 */
import { Rng } from '../random.js';

/** The permutation of 0..n-1 for (seed, epoch): Fisher-Yates with Rng(seed, `data/epoch <epoch>`). */
export function permutation(n: number, seed: number, epoch: number): Uint32Array {
  if (!Number.isSafeInteger(epoch) || epoch < 0)
    throw new RangeError(`epoch must be a non-negative safe integer, got ${epoch}`);
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  const rng = new Rng(seed, `data/epoch ${epoch}`);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    const tmp = order[i] as number;
    order[i] = order[j] as number;
    order[j] = tmp;
  }
  return order;
}
