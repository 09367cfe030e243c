/**
 * Wall-clock timing of GPU work: each sample submits the work and waits for the queue to drain,
 * so it includes submit overhead (which a real step pays too). Warm-up runs absorb pipeline
 * compilation. Median of the samples; sampling stops at `iters` or once `budgetMs` is spent.
 */
export interface Timing {
  medianMs: number;
  minMs: number;
  samples: number;
}

export async function timeIt(
  run: () => Promise<void>,
  opts: { warmup?: number; iters?: number; budgetMs?: number } = {},
): Promise<Timing> {
  const warmup = opts.warmup ?? 1;
  const iters = opts.iters ?? 5;
  const budget = opts.budgetMs ?? 20_000;
  for (let i = 0; i < warmup; i++) await run();
  const samples: number[] = [];
  const start = performance.now();
  while (samples.length < iters && (samples.length < 2 || performance.now() - start < budget)) {
    const t0 = performance.now();
    await run();
    samples.push(performance.now() - t0);
  }
  samples.sort((a, b) => a - b);
  return {
    medianMs: samples[Math.floor(samples.length / 2)] as number,
    minMs: samples[0] as number,
    samples: samples.length,
  };
}
