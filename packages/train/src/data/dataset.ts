/**
 * A data file's content -> examples and statistics, in one call: what `webtune train --data` and
 * the studio's file drop use.
 */
import type { Tokenizer } from '@webtune/models';
import { packExamples } from './batches.js';
import { DataError } from './errors.js';
import { type ChatOptions, type Example, textWindows, tokenizeRecords } from './examples.js';
import { parseJsonl } from './jsonl.js';
import { type DataStats, dataStats } from './stats.js';

export interface DatasetOptions {
  /** Names the data in messages and, with format 'auto', decides the format. */
  file: string;
  /** Tokens per example (the training sequence length T). */
  seq: number;
  /** 'auto' (default): JSON Lines for names ending in .jsonl or .ndjson, plain text otherwise. */
  format?: 'text' | 'jsonl' | 'auto';
  chat?: ChatOptions;
  /**
   * Join the examples end to end and re-cut them into full windows (packExamples). Only for data
   * trained on every token; plain text is windowed already, so it changes nothing there.
   */
  pack?: boolean;
}

export interface Dataset {
  format: 'text' | 'jsonl';
  examples: Example[];
  stats: DataStats;
  /** JSONL: lines of records dropped for having no trained token left after truncation. */
  droppedLines: number[];
}

/** The format 'auto' picks for a file name. */
export function formatOf(file: string): 'text' | 'jsonl' {
  return /\.(jsonl|ndjson)$/i.test(file) ? 'jsonl' : 'text';
}

/**
 * Tokenizes a data file's content. JSONL errors are DataErrors naming the file and line (the
 * first bad line; readJsonl lists them all); plain text is windowed as `webtune eval` does.
 */
export function prepareDataset(tokenizer: Tokenizer, content: string, options: DatasetOptions): Dataset {
  const format = options.format === undefined || options.format === 'auto' ? formatOf(options.file) : options.format;
  let examples: Example[];
  let dropped: number;
  let droppedLines: number[] = [];
  if (format === 'text') {
    if (content.trim() === '') throw new DataError(options.file, undefined, 'is empty');
    const windows = textWindows(tokenizer, content, options.seq);
    if (windows.windows === 0) {
      throw new DataError(options.file, undefined, `gives ${windows.textTokens} token(s), too few to train on`);
    }
    examples = windows.examples;
    dropped = windows.droppedTokens > 0 ? 1 : 0;
  } else {
    const records = parseJsonl(content, options.file);
    const tokenized = tokenizeRecords(tokenizer, records, {
      // Packed examples are cut into windows afterwards, so they are not truncated first.
      seq: options.pack ? Number.MAX_SAFE_INTEGER : options.seq,
      file: options.file,
      ...(options.chat === undefined ? {} : { chat: options.chat }),
    });
    examples = tokenized.examples;
    droppedLines = tokenized.droppedLines;
    dropped = droppedLines.length;
    if (examples.length === 0) {
      throw new DataError(
        options.file,
        undefined,
        `no example has a trained token within ${options.seq} tokens (every prompt fills the sequence)`,
      );
    }
  }
  if (options.pack && format === 'jsonl') {
    const masked = examples.find((e) => e.labels.some((label, t) => label !== e.inputIds[t]));
    if (masked !== undefined) {
      throw new DataError(
        options.file,
        masked.line,
        `cannot be packed: a ${masked.format} record has tokens without loss, and packed examples attend to the previous one; only {"text"} records can be packed`,
      );
    }
    examples = packExamples(examples, options.seq);
  }
  return { format, examples, stats: dataStats(examples, dropped), droppedLines };
}
