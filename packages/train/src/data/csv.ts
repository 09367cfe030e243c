/**
 * Rows of CSV (RFC 4180) or TSV (the same rules with a tab), parsed from lines as they stream by.
 *
 * - A field that starts with a double quote is quoted: it may hold separators, line breaks and
 *   doubled quotes (""), and must be followed by a separator or the end of the line. A quote
 *   anywhere else is an ordinary character. Fields are not trimmed.
 * - A line break inside a quoted field is kept as "\n" (a "\r\n" in the file included).
 * - Blank lines between rows are skipped. Each row carries the physical line it starts on.
 * - A malformed row is reported and the parser starts afresh on the next line, so a caller that
 *   skips bad lines can go on; a quoted field still open at the end of the file is fatal (it has
 *   swallowed every line after it).
 *
 * Written here rather than taken from papaparse because the reader needs what papaparse does not
 * give: input from decoded lines of any stream (papaparse streams only Files through FileReader,
 * which turns invalid bytes into U+FFFD and is absent under Node, or Node streams), and the
 * physical line of every row for error messages (papaparse reports a character cursor).
 */
import { DataError } from './errors.js';
import type { Line } from './stream.js';

export interface Row {
  /** The 1-based line the row starts on. */
  readonly line: number;
  readonly fields: string[];
}

export class DelimitedParser {
  private fields: string[] = [];
  private field = '';
  /** Inside a quoted field (which may span lines). */
  private quoted = false;
  private startLine = 0;
  private lastLine = 0;

  constructor(
    private readonly separator: ',' | '\t',
    private readonly file: string,
  ) {}

  /**
   * Feeds one whole line. Returns the row it completes, the DataError of a malformed row, or
   * undefined (a blank line, or a quoted field that goes on to the next line).
   */
  push(line: Line): Row | DataError | undefined {
    const { number, text } = line;
    this.lastLine = number;
    if (this.quoted) this.field += '\n';
    else if (text.trim() === '') return undefined;
    else this.startLine = number;
    let i = 0;
    for (;;) {
      if (this.quoted) {
        const quote = text.indexOf('"', i);
        if (quote === -1) {
          this.field += text.slice(i);
          return undefined;
        }
        this.field += text.slice(i, quote);
        if (text[quote + 1] === '"') {
          this.field += '"';
          i = quote + 2;
          continue;
        }
        this.quoted = false;
        i = quote + 1;
        if (i === text.length) return this.endRow();
        if (text[i] !== this.separator) {
          return this.fail(
            number,
            `a quoted field is followed by ${JSON.stringify(text[i])}, not a separator (write a quote inside a quoted field as "")`,
          );
        }
        this.endField();
        i++;
      } else if (text[i] === '"') {
        this.quoted = true;
        i++;
        continue;
      } else {
        const separator = text.indexOf(this.separator, i);
        if (separator === -1) {
          this.field += text.slice(i);
          return this.endRow();
        }
        this.field += text.slice(i, separator);
        this.endField();
        i = separator + 1;
      }
      if (i === text.length) return this.endRow(); // a separator at the end: an empty last field
    }
  }

  /** At the end of the file: a DataError when a quoted field was never closed. */
  end(): DataError | undefined {
    if (!this.quoted) return undefined;
    return new DataError(
      this.file,
      this.startLine,
      `a quoted field opened here is never closed (the file ends at line ${this.lastLine})`,
    );
  }

  private endField(): void {
    this.fields.push(this.field);
    this.field = '';
  }

  private endRow(): Row {
    this.endField();
    const row = { line: this.startLine, fields: this.fields };
    this.fields = [];
    return row;
  }

  private fail(line: number, reason: string): DataError {
    this.fields = [];
    this.field = '';
    this.quoted = false;
    return new DataError(this.file, line, reason);
  }
}
