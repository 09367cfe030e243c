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
