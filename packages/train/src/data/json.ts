/**
 * The elements of a JSON array of records (a .json file: `[{...}, {...}]`, as Stanford Alpaca's
 * alpaca_data.json or pandas' to_json(orient="records") write it), found while the file streams
 * by, so that only one element is held at a time, even when the whole array is on one line.
 *
 * The splitter only finds where each element begins and ends (brackets and strings, outside of
 * which JSON has no other nesting); each element's text is then parsed on its own with
 * JSON.parse, so a malformed record is one bad record with the line it starts on, and the
 * records after it still load. A file that is not an array (something before "[", after "]", or
 * an array never closed) is a DataError about the whole file.
 */
import { DataError } from './errors.js';

export interface JsonElement {
  /** The 1-based line the element starts on. */
  readonly line: number;
  readonly text: string;
}

type State = 'before' | 'first' | 'next' | 'element' | 'after' | 'done';

const isSpace = (c: number) => c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;

export class JsonArraySplitter {
  private state: State = 'before';
  private openLine = 0;
  private lastLine = 0;
  private parts: string[] = [];
  private startLine = 0;
  private depth = 0;
  private inString = false;
  private escaped = false;

  constructor(private readonly file: string) {}

  /** The first character of `text` that is not whitespace (it tells an array from JSON Lines), if any. */
  static firstCharacter(text: string): string | undefined {
    return /\S/.exec(text)?.[0];
  }

  /**
   * Feeds text (a line or a part of one, `ended` when a line break follows it); returns the
   * elements it completes.
   */
  push(text: string, line: number, ended: boolean): JsonElement[] {
    this.lastLine = line;
    const out: JsonElement[] = [];
    let from = 0; // where the current element's text in `text` starts
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      switch (this.state) {
        case 'before':
          if (isSpace(c)) break;
          if (c !== 0x5b) this.fail(line, `expected a JSON array of records ("[{...}, ...]"), found ${quote(text, i)}`);
          this.state = 'first';
          this.openLine = line;
          break;
        case 'first':
        case 'next':
          if (isSpace(c)) break;
          if (c === 0x5d && this.state === 'first') {
            this.state = 'done';
            break;
          }
          if (c === 0x5d || c === 0x2c) this.fail(line, `expected a record, found ${quote(text, i)}`);
          this.begin(line);
          from = i;
          i = this.scan(text, i, out, from);
          break;
        case 'element':
          i = this.scan(text, i, out, from);
          break;
        case 'after':
          if (isSpace(c)) break;
          if (c === 0x2c) this.state = 'next';
          else if (c === 0x5d) this.state = 'done';
          else this.fail(line, `expected "," or "]" after a record, found ${quote(text, i)}`);
          break;
        case 'done':
          if (!isSpace(c)) this.fail(line, `unexpected ${quote(text, i)} after the end of the array`);
          break;
      }
    }
    if (this.state === 'element') {
      this.parts.push(text.slice(from));
      if (ended) this.parts.push('\n');
    }
    return out;
  }

  /** At the end of the file: throws unless the array was closed. */
  end(): void {
    if (this.state === 'before')
      throw new DataError(this.file, undefined, 'is empty (expected a JSON array of records)');
    if (this.state === 'element')
      this.fail(this.startLine, `this record is never closed (the file ends at line ${this.lastLine})`);
    if (this.state !== 'done')
      this.fail(
        this.openLine,
        `the array opened on this line is never closed with "]" (the file ends at line ${this.lastLine})`,
      );
  }

  private begin(line: number): void {
    this.state = 'element';
    this.startLine = line;
    this.parts = [];
    this.depth = 0;
    this.inString = false;
    this.escaped = false;
  }

  /**
   * Scans the element from text[i]; returns the index of its last character when it ends on this
   * text (pushing it to `out`), else text.length - 1.
   */
  private scan(text: string, i: number, out: JsonElement[], from: number): number {
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === 0x5c) this.escaped = true;
        else if (c === 0x22) this.inString = false;
        continue;
      }
      if (c === 0x22) this.inString = true;
      else if (c === 0x7b || c === 0x5b) this.depth++;
      else if (c === 0x7d || c === 0x5d) {
        if (this.depth === 0) return this.finish(text, from, i, out) - 1; // "]" right after a bare value
        if (--this.depth === 0) return this.finish(text, from, i + 1, out) - 1;
      } else if (c === 0x2c && this.depth === 0) return this.finish(text, from, i, out) - 1; // "," after a bare value
    }
    return text.length - 1;
  }

  /** Ends the element at text[end) and returns `end` (where scanning resumes in state 'after'). */
  private finish(text: string, from: number, end: number, out: JsonElement[]): number {
    this.parts.push(text.slice(from, end));
    out.push({ line: this.startLine, text: this.parts.join('') });
    this.parts = [];
    this.state = 'after';
    return end;
  }

  private fail(line: number, reason: string): never {
    throw new DataError(this.file, line, reason);
  }
}

function quote(text: string, i: number): string {
  return JSON.stringify(text.slice(i, i + 12));
}
