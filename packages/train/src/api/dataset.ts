/**
 * loadDataset() for the engine: the input read and tokenized (in whichever thread the engine
 * runs: the worker, when there is one), split into training and validation examples.
 */
import type { Tokenizer } from '@webtune/models';
import { DataError, type Example, fingerprintExamples, prepareDataset, splitHeldOut } from '../data/index.js';
import type { DatasetInput, DatasetStats, LoadDatasetOptions } from './types.js';

export interface EngineDataset {
  readonly train: readonly Example[];
  readonly validation: readonly Example[];
  readonly stats: DatasetStats;
  /** The longest example, in tokens (a run's seq must be at least this). */
  readonly longest: number;
}

export const DEFAULT_SEQ = 256;

async function readInput(input: DatasetInput): Promise<string> {
  if (typeof input === 'string') return input;
  if (typeof Blob !== 'undefined' && input instanceof Blob) return input.text();
  if (typeof input === 'object' && input !== null && 'path' in input) {
    const fs = (await import(/* @vite-ignore */ 'node:fs/promises')) as typeof import('node:fs/promises');
    return fs.readFile(input.path, 'utf8');
  }
  throw new DataError('data', undefined, 'expected a File or Blob, a string, or under Node { path }');
}

function nameOf(input: DatasetInput, options: LoadDatasetOptions): string {
  if (options.file) return options.file;
  if (typeof input === 'object' && input !== null && 'name' in input && typeof input.name === 'string' && input.name)
    return input.name;
  if (typeof input === 'object' && input !== null && 'path' in input) return input.path.split(/[\\/]/).pop() ?? 'data';
  return 'data';
}

export async function loadEngineDataset(
  tokenizer: Tokenizer,
  input: DatasetInput,
  options: LoadDatasetOptions & { seq: number },
): Promise<EngineDataset> {
  const file = nameOf(input, options);
  const content = await readInput(input);
  options.onProgress?.({ type: 'tokenize', done: 0, total: content.length });
  const format = options.format === undefined || options.format === 'auto' ? undefined : options.format;
  if (format === 'csv' || format === 'tsv') throw new DataError(file, undefined, `${format} is not supported yet`);
  const dataset = prepareDataset(tokenizer, content, {
    file,
    seq: options.seq,
    ...(format ? { format } : {}),
    ...(options.chat ? { chat: options.chat } : {}),
  });
  options.onProgress?.({ type: 'tokenize', done: content.length, total: content.length });
  const fraction = options.validation ?? 0;
  const { train, heldOut } =
    fraction > 0
      ? splitHeldOut(dataset.examples, { lastFraction: fraction })
      : { train: dataset.examples, heldOut: [] };
  const all = [...train, ...heldOut];
  const tokens = train.reduce((n, e) => n + e.inputIds.length, 0);
  let trained = 0;
  for (const e of train) for (let t = 1; t < e.labels.length; t++) if (e.labels[t] !== -100) trained++;
  return {
    train,
    validation: heldOut,
    longest: all.reduce((n, e) => Math.max(n, e.inputIds.length), 0),
    stats: {
      file,
      format: dataset.format,
      seq: options.seq,
      examples: train.length,
      tokens,
      trainedTokens: trained,
      truncated: dataset.stats.truncated,
      dropped: dataset.stats.dropped,
      badLines: 0,
      validation: heldOut.length,
      fingerprint: fingerprintExamples(all),
    },
  };
}
