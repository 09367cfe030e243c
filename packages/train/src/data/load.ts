/**
 * A data file -> tokenized training and validation examples: read as a stream (stream.ts),
 * tokenized as it goes (reader.ts) in whatever thread calls it (the trainer's worker), then split,
 * packed and counted (split.ts). prepareDataset (dataset.ts) is the same for a string already in
 * memory.
 *
 * - Format 'auto' picks by file name: .jsonl/.ndjson, .json, .csv, .tsv, anything else is text.
 * - Progress is bytes read of the total (0 while unknown: a stream), at most every 100 ms, and
 *   once at the end with done == total. An abort rejects with the signal's reason (stream.ts
 *   gives the event loop a turn every 50 ms so that the abort can arrive).
 */
import type { Tokenizer } from '@webtune/models';
import { DataError } from './errors.js';
import type { ChatOptions } from './examples.js';
import { DatasetBuilder, type DatasetColumns, type DatasetFormat } from './reader.js';
import { assemble, checkValidation, type TokenizedDataset } from './split.js';
import { type ByteSource, byteLength, readLines } from './stream.js';

export type { DatasetColumns, DatasetFormat } from './reader.js';
export { BAD_LINES_KEPT } from './reader.js';
export { type TokenizedDataset, type TokenizedStats, validationRecords } from './split.js';
export { TEXT_CHUNK, TEXT_PIECE } from './text.js';

export interface ReadDatasetOptions {
  /** Names the data in messages and picks the format with 'auto' (default: File.name, else "data"). */
  readonly file?: string;
  /** Tokens per example (the training sequence length); longer examples are truncated. */
  readonly seq: number;
  readonly format?: 'auto' | DatasetFormat;
  /** CSV/TSV: the columns to read (default: found by their usual names, see reader.ts). */
  readonly columns?: DatasetColumns;
  readonly chat?: ChatOptions;
  /** Join examples end to end into full windows of seq (only for data trained on every token). Default false. */
  readonly pack?: boolean;
  /** Skip malformed lines (counted and listed) instead of stopping at the first. Default false. */
  readonly skipBadLines?: boolean;
  /** Fraction of the records held out for validation, in [0, 1). Default 0. */
  readonly validation?: number;
  /** Seeds the split. Default 0. */
  readonly seed?: number;
  /** Bytes read so far, of the total (0 while unknown). */
  readonly onProgress?: (p: { done: number; total: number }) => void;
  readonly signal?: AbortSignal;
  /** Plain text up to this many characters is tokenized whole. Default TEXT_CHUNK (text.ts). */
  readonly textChunk?: number;
  /** Beyond that, pieces of one to two times this many characters. Default TEXT_PIECE (text.ts). */
  readonly textPiece?: number;
}

/** The format 'auto' picks for a file name. */
export function detectFormat(file: string): DatasetFormat {
  if (/\.(jsonl|ndjson)$/i.test(file)) return 'jsonl';
  if (/\.json$/i.test(file)) return 'json';
  if (/\.csv$/i.test(file)) return 'csv';
  if (/\.tsv$/i.test(file)) return 'tsv';
  return 'text';
}

const FORMATS: readonly string[] = ['text', 'jsonl', 'json', 'csv', 'tsv'];

/** The format to read: the one given, or detectFormat's; an unknown one is a DataError. */
export function resolveFormat(format: string | undefined, file: string): DatasetFormat {
  if (format === undefined || format === 'auto') return detectFormat(file);
  if (!FORMATS.includes(format))
    throw new DataError(file, undefined, `unknown format ${JSON.stringify(format)} (auto, ${FORMATS.join(', ')})`);
  return format as DatasetFormat;
}

function nameOf(source: ByteSource, file: string | undefined): string {
  if (file) return file;
  const named = (source as { name?: unknown }).name;
  return typeof named === 'string' && named !== '' ? named : 'data';
}

/**
 * Reads and tokenizes a data file (see the module header and reader.ts). Every failure is a
 * DataError naming the file (and line), thrown before anything is trained.
 */
export async function readDataset(
  tokenizer: Tokenizer,
  source: ByteSource,
  options: ReadDatasetOptions,
): Promise<TokenizedDataset> {
  const file = nameOf(source, options.file);
  const format = resolveFormat(options.format, file);
  const validation = options.validation ?? 0;
  checkValidation(validation);
  const { signal, onProgress } = options;
  const total = byteLength(source);
  let read = 0;
  let lastReport = 0;
  const builder = new DatasetBuilder(tokenizer, {
    file,
    format,
    seq: options.seq,
    untruncated: options.pack,
    columns: options.columns,
    chat: options.chat,
    skipBadLines: options.skipBadLines,
    textChunk: options.textChunk,
    textPiece: options.textPiece,
  });
  const lines = readLines(source, {
    file,
    signal,
    raw: format === 'text',
    onBytes: (done) => {
      read = done;
      const now = Date.now();
      if (onProgress && now - lastReport >= 100) {
        lastReport = now;
        onProgress({ done, total });
      }
    },
  });
  for await (const line of lines) {
    builder.push(line);
    signal?.throwIfAborted();
  }
  const collected = builder.finish();
  onProgress?.({ done: read, total: total || read });
  return assemble(collected, {
    file,
    seq: options.seq,
    validation,
    seed: options.seed ?? 0,
    pack: options.pack,
  });
}
