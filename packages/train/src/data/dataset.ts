/**
 * A data file's content already in memory -> examples and statistics, in one synchronous call
 * (the studio's pasted text, scripts). The same reader as readDataset (load.ts) fed the lines of
 * the string, so the formats, rules and errors are the same; readDataset is the one for files,
 * which it streams, and adds the validation split and progress.
 */
import type { Tokenizer } from '@webtune/models';
import type { ChatOptions, Example } from './examples.js';
import { resolveFormat } from './load.js';
import { DatasetBuilder, type DatasetColumns, type DatasetFormat } from './reader.js';
import { assemble } from './split.js';
import type { DataStats } from './stats.js';
import { linesOf } from './stream.js';

export interface DatasetOptions {
  /** Names the data in messages and, with format 'auto', decides the format (detectFormat). */
  file: string;
  /** Tokens per example (the training sequence length T). */
  seq: number;
  /** Default 'auto'. */
  format?: 'auto' | DatasetFormat;
  /** CSV/TSV: the columns to read. */
  columns?: DatasetColumns;
  chat?: ChatOptions;
  /**
   * Join the examples end to end and re-cut them into full windows (packExamples). Only for data
   * trained on every token; plain text is windowed already, so it changes nothing there.
   */
  pack?: boolean;
}

export interface Dataset {
  /** The format as read. */
  format: DatasetFormat;
  examples: Example[];
  stats: DataStats;
  /** Lines of records dropped for having no trained token left after truncation. */
  droppedLines: number[];
}

/**
 * Tokenizes a data file's content. The first bad line is a DataError naming the file and line
 * (readJsonl lists them all); plain text is windowed as `webtune eval` does.
 */
export function prepareDataset(tokenizer: Tokenizer, content: string, options: DatasetOptions): Dataset {
  const { file, seq } = options;
  const format = resolveFormat(options.format, file);
  const builder = new DatasetBuilder(tokenizer, {
    file,
    format,
    seq,
    untruncated: options.pack,
    columns: options.columns,
    chat: options.chat,
  });
  for (const line of linesOf(content, format === 'text')) builder.push(line);
  const data = assemble(builder.finish(), { file, seq, validation: 0, seed: 0, pack: options.pack });
  return { format: data.format, examples: data.train, stats: data.stats, droppedLines: [...data.droppedLines] };
}
