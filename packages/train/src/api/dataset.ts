/**
 * loadDataset() for the engine: the input streamed, parsed and tokenized (in whichever thread the
 * engine runs: the worker, when there is one) by data/load.ts, split into training and validation
 * examples.
 */
import type { Tokenizer } from '@webtune/models';
import { type ByteSource, DataError, type Example, readDataset } from '../data/index.js';
import type { DatasetInput, DatasetStats, LoadDatasetOptions } from './types.js';

export interface EngineDataset {
  readonly train: readonly Example[];
  readonly validation: readonly Example[];
  readonly stats: DatasetStats;
  /** The longest example, in tokens (a run's seq must be at least this). */
  readonly longest: number;
}

export const DEFAULT_SEQ = 256;

/** What the reader takes: the input itself, or under Node a file opened as a stream. */
async function open(input: DatasetInput): Promise<{ source: ByteSource; name?: string }> {
  if (typeof input === 'string') return { source: input };
  if (typeof Blob !== 'undefined' && input instanceof Blob) {
    const name = (input as { name?: unknown }).name;
    return { source: input, ...(typeof name === 'string' && name ? { name } : {}) };
  }
  if (typeof input === 'object' && input !== null && 'path' in input) {
    // A Blob backed by the file on disk: read as a stream, its size known for progress.
    const fs = (await import(/* @vite-ignore */ 'node:fs')) as {
      openAsBlob(path: string): Promise<Blob>;
    };
    try {
      return { source: await fs.openAsBlob(input.path), name: input.path.split(/[\\/]/).pop() ?? 'data' };
    } catch (error) {
      throw new DataError(input.path, undefined, `cannot be read (${String(error)})`, { cause: error });
    }
  }
  throw new DataError('data', undefined, 'expected a File or Blob, a string, or under Node { path }');
}

export async function loadEngineDataset(
  tokenizer: Tokenizer,
  input: DatasetInput,
  options: LoadDatasetOptions & { seq: number },
): Promise<EngineDataset> {
  const { source, name } = await open(input);
  const file = options.file ?? name ?? 'data';
  const data = await readDataset(tokenizer, source, {
    file,
    seq: options.seq,
    ...(options.format ? { format: options.format } : {}),
    ...(options.columns ? { columns: options.columns } : {}),
    ...(options.chat ? { chat: options.chat } : {}),
    ...(options.skipBadLines ? { skipBadLines: true } : {}),
    ...(options.pack ? { pack: true } : {}),
    ...(options.validation ? { validation: options.validation } : {}),
    ...(options.seed !== undefined ? { seed: options.seed } : {}),
    ...(options.signal ? { signal: options.signal } : {}),
    onProgress: (p) => options.onProgress?.({ type: 'tokenize', done: p.done, total: p.total }),
  });
  const s = data.stats;
  return {
    train: data.train,
    validation: data.validation,
    longest: [...data.train, ...data.validation].reduce((n, e) => Math.max(n, e.inputIds.length), 0),
    stats: {
      file,
      format: data.format,
      seq: data.seq,
      records: s.records,
      examples: s.examples,
      tokens: s.tokens,
      trainedTokens: s.trainedTokens,
      truncated: s.truncated,
      dropped: s.dropped,
      badLines: s.badLines,
      skippedLines: data.badLines,
      validation: s.validation,
      validationTokens: s.validationTokens,
      fingerprint: data.fingerprint,
    },
  };
}
