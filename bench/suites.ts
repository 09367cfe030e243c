/**
 * The suites one bench run asks for, in their order, on one context: what the page (bench/page.ts)
 * and the Node run (bench/node.ts) both do once they have a context and a place to send records.
 */
import type { GpuContext } from '@webtune/core';
import { runKernelBenchmarks } from './kernels.js';
import { runModelBenchmarks, type SuiteOptions } from './models.js';
import { runTrainBenchmarks } from './train.js';

/**
 * Runs `suites` (kernels, models, train) and, after the models suite, `peer` (transformers.js on
 * the same cases), then destroys the context. A case that cannot run is reported through
 * `o.status` and the others go on; the run then fails naming every such case.
 */
export async function runSuites(
  ctx: GpuContext,
  suites: readonly string[],
  o: Omit<SuiteOptions, 'fail'>,
  peer?: (o: SuiteOptions) => Promise<void>,
): Promise<void> {
  const failed: string[] = [];
  const options: SuiteOptions = {
    ...o,
    fail: (key, e) => {
      const message = e instanceof Error ? e.message : String(e);
      failed.push(`${key}: ${message}`);
      o.status(`${key} failed: ${message}`);
    },
  };
  try {
    if (suites.includes('kernels')) await runKernelBenchmarks(ctx, options);
    if (suites.includes('models')) {
      await runModelBenchmarks(ctx, options);
      if (peer) await peer(options);
    }
    if (suites.includes('train')) await runTrainBenchmarks(ctx, options);
  } finally {
    ctx.destroy();
  }
  if (failed.length > 0) throw new Error(`${failed.length} case(s) could not run:\n${failed.join('\n')}`);
}
