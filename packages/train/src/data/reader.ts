/**
 * The synchronous core of reading a data file: lines in, tokenized examples out, each tagged with
 * the record it came from. readDataset (load.ts) feeds it lines from a stream and prepareDataset
 * (dataset.ts) the lines of a string, so the two give the same examples by construction. What
 * each record becomes is examples.ts's rule; this module parses, dispatches and counts.
 *
 * Formats:
 * - text: plain text, windows of seq tokens (text.ts); every window is a record.
 * - jsonl: one record per line (jsonl.ts: {"text"}, {"prompt","completion"}, {"messages"}, Alpaca).
 * - json: a JSON array of the same records (json.ts); a .json file whose first character is "{"
 *   is read as JSON Lines instead (what Hugging Face datasets' to_json writes), and reported so.
 * - csv / tsv: a header row, then one record per row (csv.ts), from the chosen columns or, by
 *   default, the columns named text; prompt and completion; or instruction, input and output.
 *
 * A bad record (a line that is not a record, a row without the text, a conversation the chat
 * template cannot split) is a DataError naming the file and line, or with skipBadLines is skipped,
 * counted and (the first BAD_LINES_KEPT) listed. Errors about the whole file are always thrown:
 * bytes that are not UTF-8, a CSV quote never closed, a .json file that is not an array, a
 * missing column, no example at all.
 */
import type { Tokenizer } from '@webtune/models';
import { DelimitedParser } from './csv.js';
import { DataError } from './errors.js';
import { type ChatOptions, type Example, tokenizeRecords } from './examples.js';
import { JsonArraySplitter } from './json.js';
import { type DataRecord, parseLine, parseRecord } from './jsonl.js';
import type { Line } from './stream.js';
import { TextWindower } from './text.js';

export type DatasetFormat = 'text' | 'jsonl' | 'json' | 'csv' | 'tsv';

/** CSV/TSV: which columns make a record. */
export type DatasetColumns =
  | { readonly text: string }
  | { readonly prompt: string; readonly completion: string }
  | { readonly instruction: string; readonly input?: string; readonly output: string };

/** Bad lines listed (all are counted). */
export const BAD_LINES_KEPT = 100;

export interface BuilderOptions {
  /** Names the data in messages. */
  readonly file: string;
  readonly format: DatasetFormat;
  /** Tokens per window of plain text, and the length records are truncated to. */
  readonly seq: number;
  /** Do not truncate records (they are packed into windows of seq afterwards). */
  readonly untruncated?: boolean | undefined;
  readonly columns?: DatasetColumns | undefined;
  readonly chat?: ChatOptions | undefined;
  readonly skipBadLines?: boolean | undefined;
  /** Plain text: see text.ts (TEXT_CHUNK, TEXT_PIECE). */
  readonly textChunk?: number | undefined;
  readonly textPiece?: number | undefined;
}

export interface Collected {
  /** The format as read (a .json file of JSON Lines: 'jsonl'). */
  readonly format: DatasetFormat;
  /** Examples in file order, with the index of the record each came from. */
  readonly examples: readonly { readonly example: Example; readonly record: number }[];
  /** Records that gave examples or were dropped (bad lines not included). */
  readonly records: number;
  /** Lines of records dropped for having no trained token within seq. */
  readonly droppedLines: readonly number[];
  /** Plain text: 1 when a last window of a single token was dropped. */
  readonly droppedWindows: number;
  readonly badLines: readonly { readonly line: number; readonly reason: string }[];
  readonly badCount: number;
}

const DEFAULT_COLUMNS = '("text"; "prompt" and "completion"; "instruction" and "output")';

/** The columns to read: as given (checked against the header), or found by their usual names. */
function chooseColumns(
  header: readonly string[],
  given: DatasetColumns | undefined,
  file: string,
  line: number,
): DatasetColumns {
  const have = new Set(header);
  const listed = header.map((name) => JSON.stringify(name)).join(', ');
  if (given) {
    const missing = Object.values(given).filter((name): name is string => name !== undefined && !have.has(name));
    if (missing.length > 0) {
      const names = missing.map((name) => JSON.stringify(name)).join(' and ');
      throw new DataError(file, line, `has no column ${names}; its columns are ${listed}`);
    }
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
    line,
    `has none of the columns read by default ${DEFAULT_COLUMNS}; its columns are ${listed}; choose them with { columns }`,
  );
}

/** A row as a record of the chosen columns, or why it is not one. */
function rowRecord(
  fields: readonly string[],
  header: ReadonlyMap<string, number>,
  columns: DatasetColumns,
  line: number,
): DataRecord | string {
  const get = (name: string | undefined) => (name === undefined ? '' : (fields[header.get(name) as number] ?? ''));
  const nonEmpty = (name: string) => (get(name).trim() === '' ? `column "${name}" is empty` : undefined);
  if ('text' in columns) return nonEmpty(columns.text) ?? { format: 'text', line, text: get(columns.text) };
  if ('prompt' in columns) {
    const empty = nonEmpty(columns.completion);
    return (
      empty ?? { format: 'prompt-completion', line, prompt: get(columns.prompt), completion: get(columns.completion) }
    );
  }
  const empty = nonEmpty(columns.output);
  return (
    empty ?? {
      format: 'alpaca',
      line,
      instruction: get(columns.instruction),
      input: get(columns.input),
      output: get(columns.output),
    }
  );
}

/** Joins the parts of a long line (stream.ts); whole lines pass through. */
class WholeLines {
  private parts: string[] = [];

  push(line: Line): Line | undefined {
    if (line.more) {
      this.parts.push(line.text);
      return undefined;
    }
    if (this.parts.length === 0) return line;
    this.parts.push(line.text);
    const text = this.parts.join('');
    this.parts = [];
    return { ...line, text };
  }
}

export class DatasetBuilder {
  private format: DatasetFormat;
  private readonly examples: { example: Example; record: number }[] = [];
  private records = 0;
  private readonly droppedLines: number[] = [];
  private readonly badLines: { line: number; reason: string }[] = [];
  private badCount = 0;
  private readonly whole = new WholeLines();
  private readonly text: TextWindower | undefined;
  private readonly csv: DelimitedParser | undefined;
  private header: { names: Map<string, number>; columns: DatasetColumns } | undefined;
  private json: JsonArraySplitter | undefined;

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly options: BuilderOptions,
  ) {
    if (!Number.isSafeInteger(options.seq) || options.seq < 2)
      throw new RangeError(`the sequence length must be an integer >= 2, got ${options.seq}`);
    this.format = options.format;
    if (this.format === 'text') {
      this.text = new TextWindower(
        tokenizer,
        { file: options.file, seq: options.seq, whole: options.textChunk, piece: options.textPiece },
        (inputIds) => {
          const window = this.records++;
          this.examples.push({
            example: { inputIds, labels: inputIds.slice(), format: 'text-window', window },
            record: window,
          });
        },
      );
    }
    if (this.format === 'csv' || this.format === 'tsv')
      this.csv = new DelimitedParser(this.format === 'csv' ? ',' : '\t', options.file);
  }

  push(line: Line): void {
    if (this.text) this.text.push(line);
    else if (this.format === 'json') this.pushJson(line);
    else {
      const whole = this.whole.push(line);
      if (whole === undefined) return;
      if (this.csv) this.pushRow(whole);
      else if (whole.text.trim() !== '') {
        const record = parseLine(whole.text, this.options.file, whole.number);
        if (record instanceof DataError) this.bad(record);
        else this.add(record);
      }
    }
  }

  /** Ends the file: the examples, or the DataError of a file with none. */
  finish(): Collected {
    const { file, seq } = this.options;
    let droppedWindows = 0;
    if (this.text) droppedWindows = this.text.end().droppedTokens > 0 ? 1 : 0;
    if (this.csv) {
      const open = this.csv.end();
      if (open) throw open;
      if (!this.header) throw new DataError(file, undefined, 'is empty (a CSV/TSV file needs a header row)');
    }
    this.json?.end();
    if (this.examples.length === 0) {
      if (this.records === 0 && this.badCount === 0)
        throw new DataError(file, undefined, 'is empty: no example to train on');
      if (this.records === 0)
        throw new DataError(file, undefined, `has no valid record (${this.badCount} bad lines skipped)`);
      throw new DataError(
        file,
        undefined,
        `no example has a trained token within ${seq} tokens (every prompt fills the sequence): raise the sequence length`,
      );
    }
    return {
      format: this.format,
      examples: this.examples,
      records: this.records,
      droppedLines: this.droppedLines,
      droppedWindows,
      badLines: this.badLines,
      badCount: this.badCount,
    };
  }

  private pushJson(line: Line): void {
    if (!this.json) {
      const first = JsonArraySplitter.firstCharacter(line.text);
      if (first === undefined) return; // blank so far
      if (first === '{') {
        // JSON Lines under a .json name.
        this.format = 'jsonl';
        this.push(line);
        return;
      }
      if (first !== '[') {
        const reason = `expected a JSON array of records ([{...}, ...]) or one record per line, found ${JSON.stringify(line.text.trim().slice(0, 12))}`;
        throw new DataError(this.options.file, line.number, reason);
      }
      this.json = new JsonArraySplitter(this.options.file);
    }
    for (const element of this.json.push(line.text, line.number, line.ended)) {
      let value: unknown;
      try {
        value = JSON.parse(element.text);
      } catch (error) {
        this.bad(
          new DataError(this.options.file, element.line, `not valid JSON (${(error as Error).message})`, {
            cause: error,
          }),
        );
        continue;
      }
      const record = parseRecord(value, this.options.file, element.line);
      if (record instanceof DataError) this.bad(record);
      else this.add(record);
    }
  }

  private pushRow(line: Line): void {
    const row = (this.csv as DelimitedParser).push(line);
    if (row === undefined) return;
    if (row instanceof DataError) {
      this.bad(row);
      return;
    }
    if (!this.header) {
      const names = row.fields.map((name) => name.trim());
      this.header = {
        names: new Map(names.map((name, i) => [name, i])),
        columns: chooseColumns(names, this.options.columns, this.options.file, row.line),
      };
      return;
    }
    const width = this.header.names.size;
    const record =
      row.fields.length === width
        ? rowRecord(row.fields, this.header.names, this.header.columns, row.line)
        : `has ${row.fields.length} fields; the header has ${width}`;
    if (typeof record === 'string') this.bad(new DataError(this.options.file, row.line, record));
    else this.add(record);
  }

  private add(record: DataRecord): void {
    const { file, seq, chat } = this.options;
    let tokenized: ReturnType<typeof tokenizeRecords>;
    try {
      tokenized = tokenizeRecords(this.tokenizer, [record], {
        seq: this.options.untruncated ? Number.MAX_SAFE_INTEGER : seq,
        file,
        ...(chat ? { chat } : {}),
      });
    } catch (error) {
      if (!(error instanceof DataError)) throw error;
      this.bad(error);
      return;
    }
    const index = this.records++;
    for (const line of tokenized.droppedLines) this.droppedLines.push(line);
    for (const example of tokenized.examples) this.examples.push({ example, record: index });
  }

  private bad(error: DataError): void {
    if (!this.options.skipBadLines) throw error;
    this.badCount++;
    if (this.badLines.length < BAD_LINES_KEPT) this.badLines.push({ line: error.line ?? 0, reason: error.reason });
  }
}
