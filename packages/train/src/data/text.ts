/**
 * Plain text of any size -> windows of `seq` tokens, read as it streams by.
 *
 * The rule, which depends only on the text (never on how the stream happens to be chunked):
 * - A text of at most `whole` characters (TEXT_CHUNK, 4 Mi) is tokenized whole, once: the windows
 *   are exactly textWindows' (and `webtune eval`'s), as for any file before streaming existed.
 * - A longer text is tokenized in pieces, each without special tokens; the special tokens the
 *   tokenizer adds to a text (Llama's BOS, BERT's [CLS] ... [SEP]) go before the first piece and
 *   after the last, and the ids of all pieces are joined and cut into windows as one stream. A
 *   piece is cut from the front of the remaining text, within its first 2 x `piece` characters
 *   (TEXT_PIECE, 1 Mi) and leaving at least `piece` in the piece:
 *     1. after the last paragraph break there (a line that is empty or only whitespace);
 *     2. else after the last line break;
 *     3. else after the last whitespace character;
 *     4. else at 2 x `piece` characters (never inside a surrogate pair).
 *   A rest of at most 2 x `piece` characters is the last piece.
 * - Effect: only the tokens at the cuts can differ from tokenizing the whole text at once. A
 *   SentencePiece tokenizer that prefixes "▁" to every text it encodes (Llama's, stories260K's)
 *   spells the first word of each piece as a word start; byte-level BPE (GPT-2, Qwen) pre-splits
 *   at whitespace and is unaffected at a line break. About one token per megabyte, where the text
 *   is at a paragraph break anyway.
 *
 * Memory: at most `whole` characters are pending before the first piece, then under 2 x `piece`
 * plus one line (or part of one), and fewer than `seq` token ids not yet in a window.
 */
import type { Tokenizer } from '@webtune/models';
import { DataError } from './errors.js';
import { textWindows } from './examples.js';
import type { Line } from './stream.js';

/** Plain text up to this many characters is tokenized whole. */
export const TEXT_CHUNK = 4 * 2 ** 20;
/** A longer text is tokenized in pieces of one to two times this many characters. */
export const TEXT_PIECE = 2 ** 20;

export interface TextWindowerOptions {
  /** Names the data in errors. */
  readonly file: string;
  readonly seq: number;
  /** Default TEXT_CHUNK. */
  readonly whole?: number | undefined;
  /** Default TEXT_PIECE, or a quarter of `whole` when that is smaller. */
  readonly piece?: number | undefined;
}

/** The special tokens encode() puts around a text, found by encoding a probe with and without them. */
function specialsAround(tokenizer: Tokenizer): { before: number[]; after: number[] } {
  const probe = 'a';
  const plain = tokenizer.encode(probe, { addSpecialTokens: false });
  const full = tokenizer.encode(probe);
  for (let k = 0; k + plain.length <= full.length; k++) {
    if (plain.every((id, i) => full[k + i] === id))
      return { before: full.slice(0, k), after: full.slice(k + plain.length) };
  }
  throw new DataError(
    'the tokenizer',
    undefined,
    'adds special tokens inside a text (cannot tokenize a big text in pieces)',
  );
}

/** The position to cut a piece at in `text` (see the module header); `text` holds more than 2 x piece. */
export function pieceEnd(text: string, piece: number): number {
  const limit = 2 * piece;
  const window = text.slice(0, limit);
  let cut = -1;
  for (const match of window.matchAll(/\n[^\S\n]*\n/g)) {
    const end = match.index + match[0].length;
    if (end >= piece) cut = end;
  }
  if (cut !== -1) return cut;
  const line = window.lastIndexOf('\n');
  if (line + 1 >= piece) return line + 1;
  for (let i = limit - 1; i >= piece - 1; i--) if (/\s/.test(window[i] as string)) return i + 1;
  const last = window.charCodeAt(limit - 1);
  return last >= 0xd800 && last <= 0xdbff ? limit - 1 : limit;
}

/** Feeds lines of plain text; calls `emit` with each window of ids as soon as it is complete. */
export class TextWindower {
  private pending = '';
  /** Pieces tokenized so far (0: the text may still be small enough to tokenize whole). */
  private pieces = 0;
  private ids: number[] = [];
  /** Tokens already emitted in windows. */
  private emitted = 0;
  private specials: { before: number[]; after: number[] } | undefined;
  private readonly whole: number;
  private readonly piece: number;

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly options: TextWindowerOptions,
    private readonly emit: (window: Int32Array) => void,
  ) {
    this.whole = options.whole ?? TEXT_CHUNK;
    this.piece = options.piece ?? Math.min(TEXT_PIECE, Math.max(1, Math.floor(this.whole / 4)));
    if (!(this.piece >= 1 && this.whole >= 2 * this.piece))
      throw new RangeError(`text pieces need 1 <= piece and 2 x piece <= whole, got ${this.piece} and ${this.whole}`);
  }

  push(line: Line): void {
    this.pending += line.ended ? `${line.text}\n` : line.text;
    if (this.pieces === 0 && this.pending.length <= this.whole) return;
    while (this.pending.length > 2 * this.piece) {
      const end = pieceEnd(this.pending, this.piece);
      this.tokenize(this.pending.slice(0, end));
      this.pending = this.pending.slice(end);
    }
  }

  /**
   * Tokenizes the rest. Returns the tokens of the whole text and those dropped (a last window of
   * one token). Throws a DataError when the text is empty or too short to train on.
   */
  end(): { tokens: number; droppedTokens: number } {
    const { file, seq } = this.options;
    if (this.pieces === 0) {
      if (this.pending.trim() === '') throw new DataError(file, undefined, 'is empty');
      const windows = textWindows(this.tokenizer, this.pending, seq);
      if (windows.windows === 0)
        throw new DataError(file, undefined, `gives ${windows.textTokens} token(s), too few to train on`);
      for (const example of windows.examples) this.emit(example.inputIds);
      return { tokens: windows.textTokens, droppedTokens: windows.droppedTokens };
    }
    if (this.pending !== '') this.tokenize(this.pending);
    this.pending = '';
    for (const id of (this.specials as { after: number[] }).after) this.ids.push(id);
    this.flushWindows();
    const tail = this.ids.length;
    if (tail >= 2) this.emit(Int32Array.from(this.ids));
    return { tokens: this.emitted + tail, droppedTokens: tail === 1 ? 1 : 0 };
  }

  private tokenize(text: string): void {
    if (this.pieces === 0) {
      this.specials = specialsAround(this.tokenizer);
      for (const id of this.specials.before) this.ids.push(id);
    }
    this.pieces++;
    for (const id of this.tokenizer.encode(text, { addSpecialTokens: false })) this.ids.push(id);
    this.flushWindows();
  }

  /** Emits the whole windows of `ids`, keeping the rest (fewer than seq). */
  private flushWindows(): void {
    const seq = this.options.seq;
    let start = 0;
    for (; start + seq <= this.ids.length; start += seq) this.emit(Int32Array.from(this.ids.slice(start, start + seq)));
    this.emitted += start;
    if (start > 0) this.ids = this.ids.slice(start);
  }
}
