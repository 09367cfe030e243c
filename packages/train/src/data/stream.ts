/**
 * A data file as a stream of lines, so that a file of any size is decoded and parsed piece by
 * piece: a 500 MB file is never in memory twice (it is never even held once).
 *
 * - Sources: a string (the content itself, encoded a slice at a time), a Blob or File (through
 *   blob.stream()), or any ReadableStream of bytes.
 * - Bytes are split at '\n' before decoding (0x0A never occurs inside a multi-byte UTF-8
 *   sequence) and each line is decoded on its own with a fatal decoder, so bytes that are not
 *   UTF-8 are a DataError naming the line and the byte offset in the file.
 * - A line longer than `partBytes` comes in parts (each ending on a whole character), so a file
 *   that is one giant line is held a part at a time too; readers that need whole lines join them.
 * - A UTF-8 byte-order mark at the very start is dropped (a U+FEFF anywhere else is text); lines
 *   end in "\n" or "\r\n" (the "\r" is removed unless `raw`).
 * - The reader gives the event loop a turn every YIELD_MS (a worker's abort message, a progress
 *   post) and rejects with the signal's reason as soon as it is aborted, even while waiting for a
 *   slow stream.
 */
import { DataError } from './errors.js';
import { completePrefix, firstInvalidByte, utf8Length } from './utf8.js';

export type ByteSource = string | Blob | ReadableStream<Uint8Array>;

export interface Line {
  /** 1-based, counted in the file (a line that comes in parts gives every part its number). */
  readonly number: number;
  /** The line, or a part of it, without its "\n" (and without a "\r" before it, unless `raw`). */
  readonly text: string;
  /** A "\n" follows `text` in the file (false for a last line without one, and for a part with more to come). */
  readonly ended: boolean;
  /** This is a part of a long line, and the line goes on in the next Line. */
  readonly more: boolean;
}

export interface StreamOptions {
  /** Names the data in errors. */
  readonly file: string;
  /** Called after each chunk with the bytes read so far. */
  readonly onBytes?: ((done: number) => void) | undefined;
  readonly signal?: AbortSignal | undefined;
  /** Keep a "\r" before the "\n" (to rebuild the text exactly). Default false. */
  readonly raw?: boolean | undefined;
  /** A line longer than this many bytes comes in parts. Default PART_BYTES. */
  readonly partBytes?: number | undefined;
}

/** Default size of the parts of a long line. */
export const PART_BYTES = 1 << 20;
/** A string source is encoded this many UTF-16 units at a time. */
const STRING_SLICE = 1 << 20;
/** Longest stretch of work between two turns of the event loop. */
const YIELD_MS = 50;

/** The byte length of a source when it is known up front (0 for a stream), without copying it. */
export function byteLength(source: ByteSource): number {
  if (typeof source === 'string') return utf8Length(source);
  if (isBlob(source)) return source.size;
  return 0;
}

function isBlob(source: ByteSource): source is Blob {
  return typeof source === 'object' && typeof (source as Blob).stream === 'function';
}

/** A promise that rejects with the signal's reason when it aborts (never unhandled), and its undoing. */
function whenAborted(signal: AbortSignal): { promise: Promise<never>; dispose(): void } {
  let listener = () => {};
  const promise = new Promise<never>((_, reject) => {
    listener = () => reject(signal.reason);
    signal.addEventListener('abort', listener, { once: true });
  });
  promise.catch(() => undefined);
  return { promise, dispose: () => signal.removeEventListener('abort', listener) };
}

/** Chunks of bytes from any source: a string in encoded slices, a Blob or a stream through its reader. */
async function* chunks(source: ByteSource, signal: AbortSignal | undefined): AsyncGenerator<Uint8Array> {
  signal?.throwIfAborted();
  if (typeof source === 'string') {
    const encoder = new TextEncoder();
    for (let i = 0; i < source.length; ) {
      let end = Math.min(source.length, i + STRING_SLICE);
      const last = source.charCodeAt(end - 1);
      if (end < source.length && last >= 0xd800 && last <= 0xdbff) end--; // keep a surrogate pair whole
      yield encoder.encode(source.slice(i, end));
      i = end;
    }
    return;
  }
  const reader = (isBlob(source) ? source.stream() : source).getReader();
  const aborted = signal ? whenAborted(signal) : undefined;
  try {
    for (;;) {
      signal?.throwIfAborted();
      const { done, value } = await (aborted ? Promise.race([reader.read(), aborted.promise]) : reader.read());
      if (done) return;
      if (value.length > 0) yield value;
    }
  } finally {
    aborted?.dispose();
    await reader.cancel().catch(() => undefined);
  }
}

function join(parts: readonly Uint8Array[], length: number): Uint8Array {
  if (parts.length === 1) return parts[0] as Uint8Array;
  const out = new Uint8Array(length);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

const nextTask = () => new Promise<void>((resolve) => setTimeout(resolve, 0));

/** The lines of a source, decoded one at a time (see the module header). */
export async function* readLines(source: ByteSource, options: StreamOptions): AsyncGenerator<Line> {
  const { file, signal } = options;
  const partBytes = Math.max(4, options.partBytes ?? PART_BYTES);
  const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  let parts: Uint8Array[] = []; // bytes of the current line not emitted yet
  let partsLength = 0;
  let lineOffset = 0; // file offset of parts[0]'s first byte
  let number = 1; // the current line's number
  let atStart = true; // nothing emitted yet: a byte-order mark is dropped
  let read = 0;
  let lastTurn = Date.now();

  const decode = (bytes: Uint8Array, ended: boolean, more: boolean): Line => {
    let at = lineOffset;
    if (atStart) {
      atStart = false;
      if (bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) {
        bytes = bytes.subarray(3);
        at += 3;
      }
    }
    let text: string;
    try {
      text = decoder.decode(bytes);
    } catch (error) {
      const bad = at + Math.max(0, firstInvalidByte(bytes));
      throw new DataError(
        file,
        number,
        `is not UTF-8 text (invalid bytes at byte offset ${bad} of the file); save the file as UTF-8`,
        { cause: error },
      );
    }
    if (!more && !options.raw && text.endsWith('\r')) text = text.slice(0, -1);
    return { number, text, ended, more };
  };

  for await (const chunk of chunks(source, signal)) {
    let start = 0;
    for (let nl = chunk.indexOf(0x0a); nl !== -1; nl = chunk.indexOf(0x0a, start)) {
      const tail = chunk.subarray(start, nl);
      const bytes = partsLength === 0 ? tail : join([...parts, tail], partsLength + tail.length);
      yield decode(bytes, true, false);
      parts = [];
      partsLength = 0;
      start = nl + 1;
      lineOffset = read + start;
      number++;
    }
    if (start < chunk.length) {
      parts.push(chunk.subarray(start));
      partsLength += chunk.length - start;
    }
    read += chunk.length;
    if (partsLength >= partBytes) {
      // A long line: emit what is complete of it, holding back a cut character and a "\r" that may end the line.
      const bytes = join(parts, partsLength);
      let cut = completePrefix(bytes);
      if (cut > 0 && bytes[cut - 1] === 0x0d) cut--;
      if (cut > 0) {
        yield decode(bytes.subarray(0, cut), false, true);
        parts = [bytes.subarray(cut)];
        partsLength = bytes.length - cut;
        lineOffset += cut;
      }
    }
    options.onBytes?.(read);
    if (Date.now() - lastTurn >= YIELD_MS) {
      await nextTask();
      lastTurn = Date.now();
    }
    signal?.throwIfAborted();
  }
  if (partsLength > 0) yield decode(join(parts, partsLength), false, false); // a last line without "\n"
}

/**
 * The lines of a string already in memory, by the same rules as readLines (byte-order mark, "\r"),
 * for the synchronous readers; whole lines only.
 */
export function* linesOf(text: string, raw = false): Generator<Line> {
  let start = text.startsWith('\uFEFF') ? 1 : 0;
  for (let number = 1; start < text.length; number++) {
    const nl = text.indexOf('\n', start);
    const end = nl === -1 ? text.length : nl;
    let line = text.slice(start, end);
    if (!raw && line.endsWith('\r')) line = line.slice(0, -1);
    yield { number, text: line, ended: nl !== -1, more: false };
    start = end + 1;
  }
}
