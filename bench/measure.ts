/**
 * Wall-clock timing of GPU work: each sample submits the work and waits for the queue to drain,
 * so it includes submit overhead (which a real step pays too). Warm-up runs absorb pipeline
 * compilation. Medians of the samples.
 */
export interface Timing {
  medianMs: number;
  minMs: number;
  samples: number;
}

function summarize(samples: number[]): Timing {
  const sorted = [...samples].sort((a, b) => a - b);
  return {
    medianMs: sorted[Math.floor(sorted.length / 2)] as number,
    minMs: sorted[0] as number,
    samples: sorted.length,
  };
}

/**
 * How settled a ratio is: the ratios of each round's two samples (baseline ms / ours, taken one
 * right after the other, so both saw the same load), their quartiles, and a two-sided sign test
 * of "as often above 1 as below". With 7 rounds all on one side p is 0.016; a p above 0.05 means
 * the samples do not say which is faster.
 */
export interface RatioSpread {
  /** Median of the rounds' own ratios (the record's ratio is the ratio of the two medians). */
  readonly median: number;
  readonly q1: number;
  readonly q3: number;
  readonly rounds: number;
  /** Rounds whose two samples took the same time (the timer's resolution): left out of the test. */
  readonly ties: number;
  readonly signP: number;
}

function quantile(sorted: readonly number[], q: number): number {
  const at = q * (sorted.length - 1);
  const lo = Math.floor(at);
  const hi = Math.min(lo + 1, sorted.length - 1);
  return (sorted[lo] as number) + (at - lo) * ((sorted[hi] as number) - (sorted[lo] as number));
}

/**
 * Two-sided sign test: P(a split at least as lopsided as k of n) when both sides are equally
 * likely. The smallest p n rounds can give is 2^(1−n) (0.25 at 3, 0.031 at 6). Terms are
 * probabilities, not counts, so n up to a few hundred stays finite.
 */
export function signTestP(k: number, n: number): number {
  if (n === 0) return 1;
  const tail = Math.min(k, n - k);
  let p = 0;
  let term = 0.5 ** n; // C(n, i) / 2^n
  for (let i = 0; i <= tail; i++) {
    p += term;
    term = (term * (n - i)) / (i + 1);
  }
  return Math.min(1, 2 * p);
}

/**
 * Two-sided Wilcoxon rank-sum (Mann–Whitney) test of two independent samples: P(a U at least as far
 * from its mean as the observed one) when both come from one distribution. For samples that were
 * not taken in pairs (webtune's and transformers.js's generation, each engine's samples in a row).
 * Ties count a half, and a U they leave between two whole values is taken at the one nearer the
 * mean (a larger p: ties never make a result look more settled). Exact (every arrangement
 * counted) while a·b ≤ `exactLimit` (2,500), else the normal approximation with a continuity
 * correction. The smallest p two samples of 5 can give is 0.0079; of 3, 0.1.
 */
export function rankSumP(a: readonly number[], b: readonly number[], exactLimit = 2_500): number {
  const m = a.length;
  const n = b.length;
  if (m === 0 || n === 0) return 1;
  let u = 0;
  for (const x of a) for (const y of b) u += x < y ? 1 : x === y ? 0.5 : 0;
  const mean = (m * n) / 2;
  // U's distance from the mean, at the whole U nearer the mean when ties left it at a half.
  const dist = Math.abs(u - mean) - (Number.isInteger(u) ? 0 : 0.5);
  if (m * n > exactLimit) {
    const sd = Math.sqrt((m * n * (m + n + 1)) / 12);
    const z = (dist - 0.5) / sd;
    return Math.min(1, 2 * (1 - normalCdf(Math.max(0, z))));
  }
  // counts[i][j][k]: arrangements of i a's and j b's in which k (a, b) pairs have the a first.
  // One row of j at a time, over i: c(i, j, k) = c(i − 1, j, k − j) + c(i, j − 1, k).
  let prev: number[][] = Array.from({ length: n + 1 }, () => [1]); // i = 0: U = 0
  for (let i = 1; i <= m; i++) {
    const row: number[][] = [[1]]; // j = 0: U = 0
    for (let j = 1; j <= n; j++) {
      const left = row[j - 1] as number[];
      const up = prev[j] as number[];
      const out = new Array<number>(i * j + 1).fill(0);
      for (let k = 0; k < left.length; k++) out[k] = (out[k] as number) + (left[k] as number);
      for (let k = 0; k < up.length; k++) out[k + j] = (out[k + j] as number) + (up[k] as number);
      row.push(out);
    }
    prev = row;
  }
  const counts = prev[n] as number[];
  const total = counts.reduce((s, c) => s + c, 0);
  let tail = 0;
  // U takes whole values here (dist is one of their distances).
  for (let k = 0; k < counts.length; k++) if (Math.abs(k - mean) >= dist - 1e-9) tail += counts[k] as number;
  return Math.min(1, tail / total);
}

/** Φ(z), the standard normal's distribution function (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7). */
function normalCdf(z: number): number {
  const x = Math.abs(z) / Math.SQRT2;
  const t = 1 / (1 + 0.3275911 * x);
  const poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  const erf = 1 - poly * Math.exp(-x * x);
  return z >= 0 ? (1 + erf) / 2 : (1 - erf) / 2;
}

export function ratioSpread(ratios: readonly number[]): RatioSpread {
  const finite = ratios.filter(Number.isFinite);
  const sorted = [...finite].sort((a, b) => a - b);
  const decided = finite.filter((r) => r !== 1);
  const above = decided.filter((r) => r > 1).length;
  return {
    median: quantile(sorted, 0.5),
    q1: quantile(sorted, 0.25),
    q3: quantile(sorted, 0.75),
    rounds: ratios.length,
    ties: finite.length - decided.length,
    signP: signTestP(above, decided.length),
  };
}

/**
 * Times ours against a baseline, one sample of each in turn, so that drift in the machine's load
 * (software drivers share two cores with everything else) falls on both alike and neither gets a
 * better chance than the other. Both get one warm-up run, then `iters` samples each, fewer once
 * `budgetMs` is spent (at least 3 each). `spread` says how settled the ratio of the two is.
 */
export async function timePair(
  mine: () => Promise<void>,
  baseline: () => Promise<void>,
  opts: { iters?: number; budgetMs?: number } = {},
): Promise<{ mine: Timing; baseline: Timing; spread: RatioSpread }> {
  const iters = opts.iters ?? 7;
  const budget = opts.budgetMs ?? 20_000;
  await baseline();
  await mine();
  const a: number[] = [];
  const b: number[] = [];
  const start = performance.now();
  while (a.length < iters && (a.length < 3 || performance.now() - start < budget)) {
    // Alternate which goes first too.
    const order = a.length % 2 === 0 ? [mine, baseline] : [baseline, mine];
    for (const run of order) {
      const t0 = performance.now();
      await run();
      (run === mine ? a : b).push(performance.now() - t0);
    }
  }
  return { mine: summarize(a), baseline: summarize(b), spread: ratioSpread(a.map((ms, i) => (b[i] as number) / ms)) };
}
