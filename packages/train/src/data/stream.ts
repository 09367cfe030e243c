/**
 * Reading a data file as a stream of lines, so that a file of any size is decoded and parsed piece
 * by piece and never held whole (a 500 MB file is not in memory twice, or even once).
 *
 * Bytes are split at '\n' before decoding (0x0A never occurs inside a multi-byte UTF-8 sequence),
 * so every line is decoded on its own with a fatal decoder: bytes that are not UTF-8 are a
 * DataError naming the line and its byte offset. A UTF-8 byte-order mark at the very start is
 * dropped; lines may end in "\n" or "\r\n" (the "\r" is removed).
 */
import { DataError } from './errors.js';

export type ByteSource = string | Blob | ReadableStream<Uint8Array>;

export interface Line {
  /** 1-based. */
  readonly number: number;
  /** The line without its "\n" (and without a "\r" before it, unless `raw`). */
  readonly text: string;
  /** False only for a last line with no "\n" after it. */
  readonly ended: boolean;
}

export interface StreamOptions {
  /** Names the data in errors. */
  readonly file: string;
  /** Called with the bytes consumed so far (of `total`, when known). */
  readonly onBytes?: (done: number) => void;
  readonly signal?: AbortSignal | undefined;
  /** Keep a "\r" before the "\n" (to rebuild the text exactly). Default false. */
  readonly raw?: boolean;
}

/** The byte length of a source when it is known up front (0 for a stream). */
export function byteLength(source: ByteSource): number {
  if (typeof source === 'string') return new TextEncoder().encode(source).length;
  if (typeof Blob !== 'undefined' && source instanceof Blob) return source.size;
  return 0;
}

/** Chunks of bytes from any source: a string in slices, a Blob or a stream through its reader. */
async function* chunks(source: ByteSource, signal: AbortSignal | undefined): AsyncGenerator<Uint8Array> {
  if (typeof source === 'string') {
    // Encoded a slice at a time (a surrogate pair is never split: slices end before a high surrogate).
    const encoder = new TextEncoder();
    const step = 1 << 20;
    for (let i = 0; i < source.length; ) {
      let end = Math.min(source.length, i + step);
      const last = source.charCodeAt(end - 1);
      if (end < source.length && last >= 0xd800 && last <= 0xdbff) end--;
      signal?.throwIfAborted();
      yield encoder.encode(source.slice(i, end));
      i = end;
    }
    return;
  }
  const stream = typeof Blob !== 'undefined' && source instanceof Blob ? source.stream() : source;
  const reader = (stream as ReadableStream<Uint8Array>).getReader();
  try {
    for (;;) {
      signal?.throwIfAborted();
      const { done, value } = await reader.read();
      if (done) return;
      if (value.length > 0) yield value;
    }
  } finally {
    await reader.cancel().catch(() => undefined);
  }
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** The lines of a source, decoded one at a time (see the module header). */
export async function* readLines(source: ByteSource, options: StreamOptions): AsyncGenerator<Line> {
  const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: false });
  let pending: Uint8Array = new Uint8Array(0);
  let number = 0;
  let offset = 0; // byte offset of `pending`'s first byte in the file
  let consumed = 0;
  const decode = (bytes: Uint8Array, at: number, line: number): string => {
    try {
      return decoder.decode(bytes);
    } catch (error) {
      // Find the first byte where decoding fails, for the message.
      let good = 0;
      for (let n = bytes.length; n > 0; n--) {
        try {
          new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(0, n), { stream: true });
          good = n;
          break;
        } catch {
          // keep shrinking
        }
      }
      throw new DataError(
        options.file,
        line,
        `is not UTF-8 text (invalid bytes at byte offset ${at + good} of the file); save the file as UTF-8`,
        { cause: error },
      );
    }
  };
  const emit = (bytes: Uint8Array, at: number, ended: boolean): Line => {
    number++;
    let text = decode(bytes, at, number);
    if (!options.raw && text.endsWith('\r')) text = text.slice(0, -1);
    return { number, text, ended };
  };
  for await (const chunk of chunks(source, options.signal)) {
    let data = concat(pending, chunk);
    let start = 0;
    for (let i = data.indexOf(0x0a); i !== -1; i = data.indexOf(0x0a, start)) {
      yield emit(data.subarray(start, i), offset + start, true);
      start = i + 1;
    }
    offset += start;
    data = data.subarray(start);
    pending = data.length > 0 ? data.slice() : new Uint8Array(0);
    consumed += chunk.length;
    options.onBytes?.(consumed);
  }
  if (pending.length > 0) yield emit(pending, offset, false);
}

// ---------------------------------------------------------------------------------------------
// CSV / TSV

/**
 * Rows of RFC 4180 CSV (or TSV: the same rules with a tab), parsed from lines as they stream: a
 * quoted field may hold separators, doubled quotes and line breaks. Each row carries the line it
 * starts on. Written here rather than taken from papaparse because papaparse streams only through
 * FileReader (absent under Node) and has no public incremental parser for decoded chunks.
 */
export async function* readDelimited(
  lines: AsyncIterable<Line>,
  separator: ',' | '\t',
  file: string,
): AsyncGenerator<{ line: number; fields: string[] }> {
  let fields: string[] = [];
  let field = '';
  let quoted = false; // inside a quoted field, across lines
  let startLine = 0;
  let last = 0;
  for await (const { number, text } of lines) {
    last = number;
    if (!quoted) {
      if (text.trim() === '' && fields.length === 0) continue; // blank line between rows
      startLine = number;
    } else field += '\n';
    let i = 0;
    while (i <= text.length) {
      if (quoted) {
        const q = text.indexOf('"', i);
        if (q === -1) {
          field += text.slice(i);
          break;
        }
        field += text.slice(i, q);
        if (text[q + 1] === '"') {
          field += '"';
          i = q + 2;
        } else {
          quoted = false;
          i = q + 1;
          const next = text[i];
          if (next !== undefined && next !== separator)
            throw new DataError(file, number, `a quoted field is followed by ${JSON.stringify(next)}, not a separator`);
        }
        continue;
      }
      if (i === text.length) {
        fields.push(field);
        field = '';
        yield { line: startLine, fields };
        fields = [];
        break;
      }
      if (text[i] === '"' && field === '') {
        quoted = true;
        i++;
        continue;
      }
      const sep = text.indexOf(separator, i);
      const end = sep === -1 ? text.length : sep;
      field += text.slice(i, end);
      if (sep === -1) {
        i = text.length;
      } else {
        fields.push(field);
        field = '';
        i = sep + 1;
        if (i === text.length) {
          fields.push('');
          yield { line: startLine, fields };
          fields = [];
          break;
        }
      }
    }
  }
  if (quoted)
    throw new DataError(file, startLine, `a quoted field opened here is never closed (the file ends at line ${last})`);
}
