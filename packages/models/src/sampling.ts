/**
 * Choosing the next token from logits on the CPU: greedy, or seeded sampling with temperature,
 * top-k and top-p applied in that order (as transformers' logits processors do).
 */

import { seededRandom } from '@webtune/core';

export { seededRandom };

export interface SamplingOptions {
  /** 0 (or below) picks the most likely token. Default 1. */
  readonly temperature?: number;
  /** Keep the k most likely tokens (0 = all). */
  readonly topK?: number;
  /** Keep the smallest set of most likely tokens whose probability reaches p (1 = all). */
  readonly topP?: number;
}

/** Index of the largest value; the first one on ties (as torch.argmax). */
export function argmax(values: ArrayLike<number>): number {
  let best = 0;
  let max = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i] as number;
    if (v > max) {
      max = v;
      best = i;
    }
  }
  return best;
}

export function sampleToken(logits: ArrayLike<number>, opts: SamplingOptions, random: () => number): number {
  const temperature = opts.temperature ?? 1;
  if (!(temperature > 0)) return argmax(logits);
  const n = logits.length;
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => (logits[b] as number) - (logits[a] as number) || a - b);
  let keep = n;
  if (opts.topK && opts.topK > 0) keep = Math.min(keep, opts.topK);
  const max = logits[order[0] as number] as number;
  const probs = new Float64Array(keep);
  let total = 0;
  for (let i = 0; i < keep; i++) {
    const p = Math.exp(((logits[order[i] as number] as number) - max) / temperature);
    probs[i] = p;
    total += p;
  }
  const topP = opts.topP ?? 1;
  if (topP < 1) {
    // Keep tokens until their cumulative probability reaches top_p (at least one).
    let cum = 0;
    for (let i = 0; i < keep; i++) {
      cum += (probs[i] as number) / total;
      if (cum >= topP) {
        keep = i + 1;
        break;
      }
    }
    total = 0;
    for (let i = 0; i < keep; i++) total += probs[i] as number;
  }
  let r = random() * total;
  for (let i = 0; i < keep; i++) {
    r -= probs[i] as number;
    if (r < 0) return order[i] as number;
  }
  return order[keep - 1] as number;
}
