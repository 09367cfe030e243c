/**
 * A data file -> tokenized training and validation examples, read as a stream (stream.ts) and
 * tokenized as it goes, in whatever thread calls it (the trainer's worker). What each format
 * becomes is examples.ts's rule; this module only reads, dispatches, splits and counts.
 *
 * Formats (format 'auto' picks by file name: .jsonl/.ndjson, .csv, .tsv, anything else is text):
 * - jsonl: one record per line ({"text"}, {"prompt","completion"}, {"messages"}, Alpaca's
 *   {"instruction","input","output"}), tokenized as each line is read.
 * - csv / tsv: a header row, then rows; `columns` names the text column, the prompt and completion
 *   columns, or Alpaca's three (by default found by those names in the header).
 * - text: plain text, cut into windows of `seq` tokens as `webtune eval` does. Up to TEXT_CHUNK
 *   bytes the text is tokenized whole, exactly as today. A bigger text is tokenized in pieces cut
 *   at paragraph breaks (an empty line) once a piece reaches TEXT_CHUNK bytes, the first with the
 *   tokenizer's special tokens and the rest without, and the ids joined: only the tokens at those
 *   breaks can differ from tokenizing the whole text at once (a SentencePiece tokenizer that
 *   prefixes "▁" to every text also prefixes each piece).
 *
 * Bad lines are a DataError naming the file and line, or with skipBadLines are skipped and
 * counted. The validation split is by record (a conversation split into several examples stays
 * on one side): the records are put in a seeded random order and the first round(validation · n)
 * go to validation (at least one, and at least one left to train on).
 */
import type { Tokenizer } from '@webtune/models';
import { fingerprintExamples } from './batches.js';
import { DataError } from './errors.js';
import { type ChatOptions, type Example, textWindows, tokenizeRecords } from './examples.js';
import { type DataRecord, parseLine } from './jsonl.js';
import { permutation } from './random.js';
import { type DataStats, dataStats } from './stats.js';
import { type ByteSource, byteLength, type Line, readDelimited, readLines } from './stream.js';

export type DatasetFormat = 'text' | 'jsonl' | 'csv' | 'tsv';

/** Plain text up to this many bytes is tokenized whole. */
export const TEXT_CHUNK = 8 * 2 ** 20;
/** Bad lines listed (all are counted). */
const BAD_LINES_KEPT = 100;

export type DatasetColumns =
  | { readonly text: string }
  | { readonly prompt: string; readonly completion: string }
  | { readonly instruction: string; readonly input?: string; readonly output: string };

export interface ReadDatasetOptions {
  /** Names the data in messages and picks the format with 'auto' (default: File.name, else "data"). */
  readonly file?: string;
  /** Tokens per example (the training sequence length); longer examples are truncated. */
  readonly seq: number;
  readonly format?: 'auto' | DatasetFormat;
  /** CSV/TSV: the columns to read. */
  readonly columns?: DatasetColumns;
  readonly chat?: ChatOptions;
  /** Skip malformed lines (counted and listed) instead of stopping at the first. Default false. */
  readonly skipBadLines?: boolean;
  /** Fraction of the records held out for validation, in [0, 1). Default 0. */
  readonly validation?: number;
  /** Seeds the split. Default 0. */
  readonly seed?: number;
  /** Bytes read so far, of the total (0 when unknown). */
  readonly onProgress?: (p: { done: number; total: number }) => void;
  readonly signal?: AbortSignal;
  /** Plain text up to this many bytes (characters) is tokenized whole. Default TEXT_CHUNK. */
  readonly textChunk?: number;
}

export interface TokenizedStats extends DataStats {
  /** Records read (lines, rows, or windows of plain text). */
  readonly records: number;
  readonly badLines: number;
  /** Examples held out for validation, and their tokens. */
  readonly validation: number;
  readonly validationTokens: number;
}

export interface TokenizedDataset {
  readonly file: string;
  readonly format: DatasetFormat;
  readonly seq: number;
  readonly train: Example[];
  readonly validation: Example[];
  readonly stats: TokenizedStats;
  /** The first bad lines skipped, with why. */
  readonly badLines: readonly { readonly line: number; readonly reason: string }[];
  /** Records dropped for having no trained token left within seq. */
  readonly droppedLines: readonly number[];
  /** fingerprintExamples() of the training then the validation examples. */
  readonly fingerprint: string;
}

/** The format 'auto' picks for a file name. */
export function detectFormat(file: string): DatasetFormat {
  if (/\.(jsonl|ndjson)$/i.test(file)) return 'jsonl';
  if (/\.csv$/i.test(file)) return 'csv';
  if (/\.tsv$/i.test(file)) return 'tsv';
  return 'text';
}

function nameOf(source: ByteSource, file: string | undefined): string {
  if (file) return file;
  const named = (source as { name?: unknown }).name;
  return typeof named === 'string' && named !== '' ? named : 'data';
}

/** A record of a CSV row by the chosen columns. */
function rowRecord(
  fields: string[],
  header: Map<string, number>,
  columns: DatasetColumns,
  line: number,
): DataRecord | string {
  const get = (name: string | undefined): string =>
    name === undefined ? '' : (fields[header.get(name) as number] ?? '');
  if ('text' in columns) {
    const text = get(columns.text);
    return text.trim() === '' ? `column "${columns.text}" is empty` : { format: 'text', line, text };
  }
  if ('prompt' in columns) {
    const completion = get(columns.completion);
    if (completion.trim() === '') return `column "${columns.completion}" is empty`;
    return { format: 'prompt-completion', line, prompt: get(columns.prompt), completion };
  }
  const output = get(columns.output);
  if (output.trim() === '') return `column "${columns.output}" is empty`;
  return { format: 'alpaca', line, instruction: get(columns.instruction), input: get(columns.input), output };
}

/** The columns to read: as given (checked against the header), or found by their usual names. */
function chooseColumns(header: string[], given: DatasetColumns | undefined, file: string): DatasetColumns {
  const have = new Set(header);
  const listed = header.map((h) => JSON.stringify(h)).join(', ');
  if (given) {
    for (const name of Object.values(given))
      if (name !== undefined && !have.has(name))
        throw new DataError(file, 1, `has no column ${JSON.stringify(name)}; its columns are ${listed}`);
    return given;
  }
  if (have.has('text')) return { text: 'text' };
  if (have.has('prompt') && have.has('completion')) return { prompt: 'prompt', completion: 'completion' };
  if (have.has('instruction') && have.has('output'))
    return have.has('input')
      ? { instruction: 'instruction', input: 'input', output: 'output' }
      : { instruction: 'instruction', output: 'output' };
  throw new DataError(
    file,
    1,
    `has none of the columns webtune reads by default ("text"; "prompt" and "completion"; "instruction" and "output"): its columns are ${listed}; choose them with { columns }`,
  );
}

interface Collector {
  /** Examples with the record each came from. */
  examples: { example: Example; record: number }[];
  records: number;
  dropped: number[];
  bad: { line: number; reason: string }[];
  badCount: number;
}

/**
 * Reads and tokenizes a data file (see the module header). Every failure is a DataError naming
 * the file (and line), thrown before anything is trained.
 */
export async function readDataset(
  tokenizer: Tokenizer,
  source: ByteSource,
  options: ReadDatasetOptions,
): Promise<TokenizedDataset> {
  const file = nameOf(source, options.file);
  const format = !options.format || options.format === 'auto' ? detectFormat(file) : options.format;
  if (!['text', 'jsonl', 'csv', 'tsv'].includes(format))
    throw new DataError(file, undefined, `unknown format ${JSON.stringify(format)} (text, jsonl, csv or tsv)`);
  const seq = options.seq;
  if (!Number.isSafeInteger(seq) || seq < 2)
    throw new RangeError(`the sequence length must be an integer >= 2, got ${seq}`);
  const fraction = options.validation ?? 0;
  if (!(fraction >= 0 && fraction < 1))
    throw new RangeError(`validation must be a fraction in [0, 1), got ${fraction}`);
  const total = byteLength(source);
  let lastReport = 0;
  const report = (done: number, force = false) => {
    const now = Date.now();
    if (force || now - lastReport >= 100) {
      lastReport = now;
      options.onProgress?.({ done, total });
    }
  };
  const lines = readLines(source, {
    file,
    signal: options.signal,
    onBytes: (done) => report(done),
    raw: format === 'text',
  });
  const c: Collector = { examples: [], records: 0, dropped: [], bad: [], badCount: 0 };
  const badLine = (error: DataError) => {
    if (!options.skipBadLines) throw error;
    c.badCount++;
    if (c.bad.length < BAD_LINES_KEPT) c.bad.push({ line: error.line ?? 0, reason: error.reason });
  };
  const addRecord = (record: DataRecord) => {
    let tokenized: ReturnType<typeof tokenizeRecords>;
    try {
      tokenized = tokenizeRecords(tokenizer, [record], {
        seq,
        file,
        ...(options.chat ? { chat: options.chat } : {}),
      });
    } catch (error) {
      if (error instanceof DataError) return badLine(error);
      throw error;
    }
    const index = c.records++;
    c.dropped.push(...tokenized.droppedLines);
    for (const example of tokenized.examples) c.examples.push({ example, record: index });
  };

  if (format === 'jsonl') {
    for await (const { number, text } of lines) {
      if (text.trim() === '') continue;
      const parsed = parseLine(number === 1 && text.startsWith('\uFEFF') ? text.slice(1) : text, file, number);
      if (parsed instanceof DataError) badLine(parsed);
      else addRecord(parsed);
    }
  } else if (format === 'csv' || format === 'tsv') {
    let header: Map<string, number> | undefined;
    let columns: DatasetColumns | undefined;
    for await (const row of readDelimited(lines, format === 'csv' ? ',' : '\t', file)) {
      if (!header) {
        const names = row.fields.map((f, i) => (i === 0 ? f.replace(/^\uFEFF/, '') : f).trim());
        header = new Map(names.map((n, i) => [n, i]));
        columns = chooseColumns(names, options.columns, file);
        continue;
      }
      if (row.fields.length !== header.size) {
        badLine(new DataError(file, row.line, `has ${row.fields.length} fields; the header has ${header.size}`));
        continue;
      }
      const record = rowRecord(row.fields, header, columns as DatasetColumns, row.line);
      if (typeof record === 'string') badLine(new DataError(file, row.line, record));
      else addRecord(record);
    }
    if (!header) throw new DataError(file, undefined, 'is empty (a CSV/TSV file needs a header row)');
  } else {
    await plainText(tokenizer, lines, seq, c, file, options.textChunk ?? TEXT_CHUNK);
  }
  report(total || lastReport, true);

  if (c.examples.length === 0) {
    if (c.records === 0 && c.badCount === 0) throw new DataError(file, undefined, 'is empty: no example to train on');
    if (c.records === 0) throw new DataError(file, undefined, `has no valid record (${c.badCount} bad lines skipped)`);
    throw new DataError(
      file,
      undefined,
      `no example has a trained token within ${seq} tokens (every prompt fills the sequence): raise the sequence length`,
    );
  }

  const held = new Set<number>();
  if (fraction > 0) {
    const n = c.records;
    if (n < 2) throw new DataError(file, undefined, 'holding out a validation split needs at least 2 records');
    const count = Math.min(n - 1, Math.max(1, Math.round(fraction * n)));
    const order = permutation(n, options.seed ?? 0, 0);
    for (let i = 0; i < count; i++) held.add(order[i] as number);
  }
  const train: Example[] = [];
  const validation: Example[] = [];
  for (const { example, record } of c.examples) (held.has(record) ? validation : train).push(example);
  if (train.length === 0)
    throw new DataError(file, undefined, 'the validation split left no example to train on; lower validation');
  const base = dataStats(train, c.dropped.length);
  return {
    file,
    format,
    seq,
    train,
    validation,
    stats: {
      ...base,
      records: c.records,
      badLines: c.badCount,
      validation: validation.length,
      validationTokens: validation.reduce((n, e) => n + e.inputIds.length, 0),
    },
    badLines: c.bad,
    droppedLines: c.dropped,
    fingerprint: fingerprintExamples([...train, ...validation]),
  };
}

/** Plain text: windows of seq tokens, the text tokenized whole or in paragraph pieces (module header). */
async function plainText(
  tokenizer: Tokenizer,
  lines: AsyncIterable<Line>,
  seq: number,
  c: Collector,
  file: string,
  chunk: number,
): Promise<void> {
  const window = (inputIds: Int32Array) => {
    c.examples.push({
      example: { inputIds, labels: inputIds.slice(), format: 'text-window', window: c.records },
      record: c.records++,
    });
  };
  let pending: string[] = []; // text since the last piece, line by line with its "\n"
  let pendingLength = 0;
  let lastBreak = -1; // pending[0, lastBreak) ends with a paragraph break
  let pieces = 0;
  let ids: number[] = []; // tokens not yet in a whole window
  const tokenize = (text: string) => {
    for (const id of tokenizer.encode(text, { addSpecialTokens: pieces === 0 })) ids.push(id);
    pieces++;
    let start = 0;
    for (; start + seq <= ids.length; start += seq) window(Int32Array.from(ids.slice(start, start + seq)));
    ids = ids.slice(start);
  };
  for await (const line of lines) {
    const text = line.ended ? `${line.text}\n` : line.text;
    pending.push(text);
    pendingLength += text.length;
    if (line.text.trim() === '') lastBreak = pending.length;
    if (pendingLength >= chunk && lastBreak > 0) {
      tokenize(pending.slice(0, lastBreak).join(''));
      pending = pending.slice(lastBreak);
      pendingLength = pending.reduce((n, l) => n + l.length, 0);
      lastBreak = -1;
    }
  }
  const rest = pending.join('');
  if (pieces === 0) {
    // The whole text at once: exactly textWindows (and `webtune eval`).
    if (rest.trim() === '') throw new DataError(file, undefined, 'is empty');
    const windows = textWindows(tokenizer, rest, seq);
    if (windows.windows === 0)
      throw new DataError(file, undefined, `gives ${windows.textTokens} token(s), too few to train on`);
    for (const e of windows.examples) window(e.inputIds);
    return;
  }
  if (rest !== '') tokenize(rest);
  // The last window, if it holds at least 2 tokens (as windowBounds keeps it).
  if (ids.length >= 2) window(Int32Array.from(ids));
}
