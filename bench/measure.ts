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
 * Times ours against a baseline, one sample of each in turn, so that drift in the machine's load
 * (software drivers share two cores with everything else) falls on both alike and neither gets a
 * better chance than the other. Both get one warm-up run, then `iters` samples each, fewer once
 * `budgetMs` is spent (at least 3 each).
 */
export async function timePair(
  mine: () => Promise<void>,
  baseline: () => Promise<void>,
  opts: { iters?: number; budgetMs?: number } = {},
): Promise<{ mine: Timing; baseline: Timing }> {
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
  return { mine: summarize(a), baseline: summarize(b) };
}
