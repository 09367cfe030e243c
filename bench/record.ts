import type { BenchModelId } from './cases.js';

/** One benchmark result: `ratio = baseline ms / ms`, so above 1 means faster than the baseline. */
export interface BenchRecord {
  name: string;
  shape: string;
  ms: number;
  gflops: number | null;
  baseline: string | null;
  baselineMs: number | null;
  ratio: number | null;
  adapter: string;
  /**
   * Exact runtime counts (GpuContext.counters, subtracted around the timed work) of one training
   * step: compute dispatches, queue submits, and readbacks whose data the host waited for with
   * nothing queued after them (train records only).
   */
  dispatchesPerStep?: number;
  submitsPerStep?: number;
  blockingReadbacksPerStep?: number;
  /** The peak of live GPU buffer bytes while the case ran (weights included). */
  gpuBytes?: number;
  /** Compute dispatches of one decode step (decode records only). */
  dispatchesPerToken?: number;
  /** Extra figures where they mean something (tokens/s, bytes). */
  extra?: Record<string, number | string>;
}

/** What every suite of the page gets. */
export interface BenchOptions {
  adapter: string;
  quick: boolean;
  /** Run only the benchmarks whose name (kernels) or case key (models, train) contains this. */
  only?: string;
  /** Kernels only: run only the cases whose shape label (the record's `shape`) contains this. */
  shape?: string;
  /** Rounds of ours against the baseline per kernel case (`--samples N`), whatever they take
   * (default 7 within a time budget); and the samples of every generation case on each engine
   * (default: bench/cases.ts's per case). */
  samples?: number;
  report: (r: BenchRecord) => void;
  status: (s: string) => void;
}

/** What bench/run.ts asks of a Node run (bench/node.ts): the page's URL parameters, as a file. */
export interface NodeBenchSpec {
  readonly root: string;
  readonly adapterName: string;
  readonly suites: readonly string[];
  readonly quick: boolean;
  readonly only?: string;
  readonly shape?: string;
  readonly samples?: number;
  readonly kernelProfile: 'auto' | 'gpu' | 'cpu';
  readonly matmulStaging: 'auto' | 'workgroup' | 'direct';
  /** The ONNX exports' folder and the models exported there; absent: no peer. */
  readonly peer?: { readonly dir: string; readonly ids: readonly BenchModelId[] };
}
