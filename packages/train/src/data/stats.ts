/**
 * What a data set holds and what training on it will cost, for the UI to show before training.
 */
import { type Example, IGNORE_INDEX } from './examples.js';

export interface DataStats {
  /** Examples kept. */
  examples: number;
  /** Their tokens (after truncation). */
  tokens: number;
  /**
   * Trained tokens: positions whose label counts in the loss (t >= 1, label not IGNORE_INDEX; the
   * label at position 0 is never predicted). For plain text this is `webtune eval`'s token count.
   */
  trainedTokens: number;
  /** Examples cut to the sequence length. */
  truncated: number;
  /** Tokens cut off by those truncations. */
  truncatedTokens: number;
  /** Examples left out: no trained token left after truncation, or a plain-text tail of 1 token. */
  dropped: number;
  /** The longest example, in tokens. */
  maxLength: number;
  /** Examples per kind. */
  byFormat: Partial<Record<Example['format'], number>>;
}

/** Statistics of examples; `dropped` is counted by whoever dropped them (tokenizeRecords, textWindows). */
export function dataStats(examples: readonly Example[], dropped = 0): DataStats {
  const stats: DataStats = {
    examples: examples.length,
    tokens: 0,
    trainedTokens: 0,
    truncated: 0,
    truncatedTokens: 0,
    dropped,
    maxLength: 0,
    byFormat: {},
  };
  for (const e of examples) {
    const n = e.inputIds.length;
    stats.tokens += n;
    for (let t = 1; t < n; t++) if (e.labels[t] !== IGNORE_INDEX) stats.trainedTokens++;
    if (e.fullLength !== undefined) {
      stats.truncated++;
      stats.truncatedTokens += e.fullLength - n;
    }
    stats.maxLength = Math.max(stats.maxLength, n);
    stats.byFormat[e.format] = (stats.byFormat[e.format] ?? 0) + 1;
  }
  return stats;
}

export interface EstimateOptions {
  /** Rows per batch. */
  batch: number;
  /** Tokens per row. */
  seq: number;
  /** Batches accumulated into one optimizer step. Default 1. */
  gradAccum?: number;
  /** Train for this many optimizer steps ... */
  steps?: number;
  /** ... or for this many epochs (default 1 when steps is not given). */
  epochs?: number;
  /** As in BatchOptions. Default false. */
  dropLast?: boolean;
}

export interface TrainingEstimate {
  batchesPerEpoch: number;
  /** Optimizer steps in one epoch (batchesPerEpoch / gradAccum, rounded up). */
  stepsPerEpoch: number;
  /** Optimizer steps in the whole run. */
  steps: number;
  /** Batches in the whole run (steps x gradAccum, or epochs x batchesPerEpoch rounded up). */
  batches: number;
  /** Epochs the run covers (fractional when it ends inside an epoch). */
  epochs: number;
  /** Token slots the GPU processes in the run: batches x batch x seq (padding included). */
  slots: number;
  /** Of those, the share that is padding (expected value). */
  paddingFraction: number;
  /** Trained tokens over the run (expected value: exact for whole epochs without dropLast). */
  trainedTokens: number;
}

/** How many batches, steps and tokens a run will take (see TrainingEstimate). */
export function estimateTraining(stats: DataStats, options: EstimateOptions): TrainingEstimate {
  const { batch, seq } = options;
  const accum = options.gradAccum ?? 1;
  for (const [name, value] of [
    ['batch', batch],
    ['seq', seq],
    ['gradAccum', accum],
  ] as const) {
    if (!Number.isSafeInteger(value) || value < 1)
      throw new RangeError(`${name} must be an integer >= 1, got ${value}`);
  }
  if (stats.examples === 0) throw new RangeError('no examples to train on');
  if (options.steps !== undefined && options.epochs !== undefined) {
    throw new RangeError('give steps or epochs, not both');
  }
  const batchesPerEpoch = options.dropLast ? Math.floor(stats.examples / batch) : Math.ceil(stats.examples / batch);
  if (batchesPerEpoch === 0) {
    throw new RangeError(`dropLast with ${stats.examples} examples and batches of ${batch} leaves no batch`);
  }
  const stepsPerEpoch = Math.ceil(batchesPerEpoch / accum);
  let steps: number;
  let batches: number;
  if (options.steps !== undefined) {
    if (!Number.isSafeInteger(options.steps) || options.steps < 1) {
      throw new RangeError(`steps must be an integer >= 1, got ${options.steps}`);
    }
    steps = options.steps;
    batches = steps * accum;
  } else {
    const epochs = options.epochs ?? 1;
    if (!(epochs > 0) || !Number.isFinite(epochs)) throw new RangeError(`epochs must be > 0, got ${epochs}`);
    batches = Math.ceil(epochs * batchesPerEpoch);
    steps = Math.ceil(batches / accum); // a last step may accumulate fewer batches
  }
  const epochs = batches / batchesPerEpoch;
  // Examples served per epoch: all of them, or whole batches only with dropLast.
  const served = Math.min(stats.examples, batchesPerEpoch * batch);
  const share = served / stats.examples;
  const slots = batches * batch * seq;
  const tokens = stats.tokens * share * epochs;
  return {
    batchesPerEpoch,
    stepsPerEpoch,
    steps,
    batches,
    epochs,
    slots,
    paddingFraction: slots === 0 ? 0 : Math.max(0, 1 - tokens / slots),
    trainedTokens: Math.round(stats.trainedTokens * share * epochs),
  };
}
