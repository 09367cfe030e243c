// The pieces under readDataset, without a real tokenizer: UTF-8 arithmetic, lines from any byte
// source (parts of long lines, byte-order marks, invalid bytes, abort), the CSV and JSON-array
// parsers, where plain text is cut into pieces, and tens of megabytes streamed through with the
// memory held bounded.
import type { Tokenizer } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { DelimitedParser, type Row } from '../src/data/csv.js';
import { DataError } from '../src/data/errors.js';
import { JsonArraySplitter } from '../src/data/json.js';
import { readDataset } from '../src/data/load.js';
import { type ByteSource, type Line, linesOf, readLines } from '../src/data/stream.js';
import { pieceEnd, TextWindower } from '../src/data/text.js';
import { completePrefix, firstInvalidByte, utf8Length } from '../src/data/utf8.js';

const encoder = new TextEncoder();

/** A stream of `bytes` in chunks of `size` bytes. */
function chunked(bytes: Uint8Array, size: number): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (at >= bytes.length) return controller.close();
      controller.enqueue(bytes.slice(at, at + size));
      at += size;
    },
  });
}

async function collect(source: ByteSource, options: Partial<Parameters<typeof readLines>[1]> = {}): Promise<Line[]> {
  const lines: Line[] = [];
  for await (const line of readLines(source, { file: 'f', ...options })) lines.push(line);
  return lines;
}

/** The text the lines stand for (parts joined, line breaks back). */
const rebuild = (lines: readonly Line[]) => lines.map((l) => (l.ended ? `${l.text}\n` : l.text)).join('');

/**
 * A tokenizer stand-in: one id per `width` UTF-16 units, BOS 1 first with special tokens, EOS 2.
 * It records the longest text it was asked to encode.
 */
function fakeTokenizer(width = 1): Tokenizer & { longest: number; calls: number } {
  const fake = {
    longest: 0,
    calls: 0,
    description: 'fake',
    vocabSize: 1000,
    bosTokenId: 1,
    eosTokenIds: [2],
    padTokenId: undefined,
    unkTokenId: undefined,
    specialTokenIds: new Set([1, 2]),
    hasChatTemplate: false,
    encode(text: string, options: { addSpecialTokens?: boolean } = {}) {
      fake.longest = Math.max(fake.longest, text.length);
      fake.calls++;
      const ids = options.addSpecialTokens === false ? [] : [1];
      for (let i = 0; i < text.length; i += width) ids.push(3 + (text.charCodeAt(i) % 997));
      return ids;
    },
    decode: () => '',
    streamDecoder: () => ({ push: () => '', flush: () => '' }),
    tokenToId: () => undefined,
    idToToken: () => undefined,
    applyChatTemplate: () => {
      throw new Error('no template');
    },
  };
  return fake as unknown as Tokenizer & { longest: number; calls: number };
}

describe('UTF-8 arithmetic', () => {
  it('utf8Length counts what TextEncoder writes, lone surrogates included', () => {
    for (const text of ['', 'abc', 'é', '日本語', '🙂x', 'a\uD83Db', '\uDE00', 'z\uD83D']) {
      expect(utf8Length(text), JSON.stringify(text)).toBe(encoder.encode(text).length);
    }
  });

  it('completePrefix never ends inside a character', () => {
    const bytes = encoder.encode('a日🙂');
    expect(completePrefix(bytes)).toBe(bytes.length);
    expect(completePrefix(bytes.subarray(0, 3))).toBe(1); // "a" and 2 of 日's 3 bytes
    expect(completePrefix(bytes.subarray(0, 6))).toBe(4); // 2 of 🙂's 4 bytes
    expect(completePrefix(bytes.subarray(0, 7))).toBe(4);
  });

  it('firstInvalidByte finds the first malformed sequence', () => {
    expect(firstInvalidByte(encoder.encode('plain é 日 🙂'))).toBe(-1);
    expect(firstInvalidByte(new Uint8Array([0x61, 0xff, 0x62]))).toBe(1);
    expect(firstInvalidByte(new Uint8Array([0x61, 0xc0, 0xaf]))).toBe(1); // overlong "/"
    expect(firstInvalidByte(new Uint8Array([0xed, 0xa0, 0x80]))).toBe(0); // a surrogate
    expect(firstInvalidByte(new Uint8Array([0x61, 0x62, 0xe6, 0x97]))).toBe(2); // cut off at the end
    expect(firstInvalidByte(new Uint8Array([0xf4, 0x90, 0x80, 0x80]))).toBe(0); // above U+10FFFF
  });
});

describe('readLines', () => {
  const text = '\uFEFFfirst\r\nsecond é\n\n\uFEFFfourth 日本\r\nlast 🙂';

  it('gives the same lines from a string, a Blob and streams in any chunking', async () => {
    const want = [...linesOf(text)];
    expect(want.map((l) => l.text)).toEqual(['first', 'second é', '', '\uFEFFfourth 日本', 'last 🙂']);
    expect(want.map((l) => l.ended)).toEqual([true, true, true, true, false]);
    const bytes = encoder.encode(text);
    for (const source of [text, new Blob([bytes]), chunked(bytes, 1), chunked(bytes, 7), chunked(bytes, 4096)]) {
      expect(await collect(source)).toEqual(want);
    }
  });

  it('drops a byte-order mark at the start only, and keeps "\\r" when raw', async () => {
    const raw = await collect(text, { raw: true });
    expect(raw.map((l) => l.text)).toEqual([...linesOf(text, true)].map((l) => l.text));
    expect(rebuild(raw)).toBe(text.slice(1));
    expect(await collect('')).toEqual([]);
    expect(await collect('a\n')).toEqual([{ number: 1, text: 'a', ended: true, more: false }]);
  });

  it('gives a long line in parts that end on whole characters and join into the line', async () => {
    const line = `${'ab日🙂'.repeat(5000)}\r`;
    const file = `short\n${line}\nafter`;
    const bytes = encoder.encode(file);
    for (const size of [3, 1000, 4000]) {
      const lines = await collect(chunked(bytes, size), { partBytes: 4096, raw: true });
      expect(rebuild(lines), `chunks of ${size}`).toBe(file);
      const parts = lines.filter((l) => l.number === 2);
      expect(parts.length).toBeGreaterThan(3);
      expect(parts.slice(0, -1).every((p) => p.more && !p.ended)).toBe(true);
      for (const part of parts) expect(utf8Length(part.text)).toBeLessThanOrEqual(4096 + size);
      expect(lines.at(-1)).toEqual({ number: 3, text: 'after', ended: false, more: false });
    }
    // Not raw: the "\r" before the "\n" goes, even though it was read in an earlier part.
    const cooked = await collect(chunked(bytes, 4096), { partBytes: 4096 });
    expect(
      cooked
        .filter((l) => l.number === 2)
        .map((l) => l.text)
        .join(''),
    ).toBe(line.slice(0, -1));
  });

  it('names the line and byte offset of bytes that are not UTF-8, in any chunk', async () => {
    const good = encoder.encode('ok\nstill ok é\n');
    const bytes = new Uint8Array([...good, 0x61, 0x62, 0xe9, 0x74, 0x65, 0x0a]); // Latin-1 "abéte"
    for (const source of [new Blob([bytes]), chunked(bytes, 5)]) {
      const error = await collect(source).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(DataError);
      expect((error as DataError).message).toBe(
        `f, line 3: is not UTF-8 text (invalid bytes at byte offset ${good.length + 2} of the file); save the file as UTF-8`,
      );
    }
  });

  it('rejects with the signal’s reason, also while a stream keeps it waiting', async () => {
    const before = new AbortController();
    before.abort(new DOMException('early', 'AbortError'));
    await expect(collect('a\nb', { signal: before.signal })).rejects.toThrow('early');
    const stalled = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(encoder.encode('one line\n'));
      },
    });
    const controller = new AbortController();
    const lines: Line[] = [];
    const reading = (async () => {
      for await (const line of readLines(stalled, { file: 'f', signal: controller.signal })) {
        lines.push(line);
        setTimeout(() => controller.abort(), 10);
      }
    })();
    await expect(reading).rejects.toMatchObject({ name: 'AbortError' });
    expect(lines.map((l) => l.text)).toEqual(['one line']);
  });
});

describe('DelimitedParser (CSV/TSV)', () => {
  const parse = (text: string, separator: ',' | '\t' = ',') => {
    const parser = new DelimitedParser(separator, 'f.csv');
    const out: (Row | string)[] = [];
    for (const line of linesOf(text)) {
      const row = parser.push(line);
      if (row instanceof DataError) out.push(row.message);
      else if (row) out.push(row);
    }
    const end = parser.end();
    if (end) out.push(end.message);
    return out;
  };

  it('reads quotes, doubled quotes, separators and line breaks inside quotes, empty fields', () => {
    expect(parse('a,b,c\r\n"x, y","say ""hi""",\r\n\r\n"two\r\nlines",,"z"\nplain "quote",1,2')).toEqual([
      { line: 1, fields: ['a', 'b', 'c'] },
      { line: 2, fields: ['x, y', 'say "hi"', ''] },
      { line: 4, fields: ['two\nlines', '', 'z'] },
      { line: 6, fields: ['plain "quote"', '1', '2'] },
    ]);
    expect(parse('q\ta\n"tab\there"\t"x"\n', '\t')).toEqual([
      { line: 1, fields: ['q', 'a'] },
      { line: 2, fields: ['tab\there', 'x'] },
    ]);
  });

  it('reports a malformed row and goes on; an unclosed quote at the end is fatal', () => {
    expect(parse('a,b\n"x"y,1\nok,2\n"open,3\nmore')).toEqual([
      { line: 1, fields: ['a', 'b'] },
      'f.csv, line 2: a quoted field is followed by "y", not a separator (write a quote inside a quoted field as "")',
      { line: 3, fields: ['ok', '2'] },
      'f.csv, line 4: a quoted field opened here is never closed (the file ends at line 5)',
    ]);
  });
});

describe('JsonArraySplitter', () => {
  const split = (pieces: [string, number, boolean][]) => {
    const splitter = new JsonArraySplitter('f.json');
    const out = pieces.flatMap(([text, line, ended]) => splitter.push(text, line, ended));
    splitter.end();
    return out;
  };

  it('finds each element, across lines and parts, strings with brackets and escapes included', () => {
    const records = [{ text: 'a ] } , "q" \\' }, { prompt: '[x]', completion: '{y}' }, 7, 'bare'];
    const oneLine = JSON.stringify(records);
    expect(split([[oneLine, 1, false]]).map((e) => JSON.parse(e.text))).toEqual(records);
    // The same line in parts of 5 characters.
    const parts: [string, number, boolean][] = [];
    for (let i = 0; i < oneLine.length; i += 5) parts.push([oneLine.slice(i, i + 5), 1, false]);
    expect(split(parts).map((e) => JSON.parse(e.text))).toEqual(records);
    // Pretty-printed: each element starts on its own line.
    const pretty = JSON.stringify(records, null, 2).split('\n');
    const elements = split(pretty.map((text, i) => [text, i + 1, i < pretty.length - 1]));
    expect(elements.map((e) => JSON.parse(e.text))).toEqual(records);
    expect(elements.map((e) => e.line)).toEqual([2, 5, 9, 10]);
    expect(split([['[]', 1, false]])).toEqual([]);
  });

  it('rejects what is not an array of records', () => {
    expect(() => split([['{"text": "x"}', 1, false]])).toThrow(/f\.json, line 1: expected a JSON array/);
    expect(() => split([['[{"a": 1}] x', 1, false]])).toThrow(/after the end of the array/);
    expect(() => split([['[{"a": 1},]', 1, false]])).toThrow(/expected a record, found "]"/);
    expect(() => split([['[{"a": 1}', 1, true]])).toThrow(/line 1: the array opened on this line is never closed/);
    expect(() => split([['[{"a": [1', 1, true]])).toThrow(/line 1: this record is never closed/);
    expect(() => split([])).toThrow(/f\.json: is empty/);
  });
});

describe('plain text pieces', () => {
  it('pieceEnd cuts at a paragraph break, else a line break, else whitespace, else the limit', () => {
    const piece = 10;
    expect(pieceEnd(`${'a'.repeat(12)}\n\n${'b'.repeat(10)}`, piece)).toBe(14);
    expect(pieceEnd(`aaa\n\n${'a'.repeat(7)}\n${'b'.repeat(20)}`, piece)).toBe(13); // the break at 5 leaves too little
    expect(pieceEnd(`${'a'.repeat(12)}\n \t\n${'b'.repeat(10)}`, piece)).toBe(16);
    expect(pieceEnd(`${'a'.repeat(15)} ${'b'.repeat(10)}`, piece)).toBe(16);
    expect(pieceEnd('a'.repeat(30), piece)).toBe(20);
    expect(pieceEnd(`${'a'.repeat(19)}🙂${'b'.repeat(5)}`, piece)).toBe(19);
  });

  it('is tokenized whole up to the limit, in pieces beyond it, the same whatever the chunking', async () => {
    const run = async (source: ByteSource) => {
      const tok = fakeTokenizer();
      const windows: number[][] = [];
      const windower = new TextWindower(tok, { file: 't', seq: 8, whole: 64, piece: 16 }, (w) => windows.push([...w]));
      for await (const line of readLines(source, { file: 't', raw: true, partBytes: 8 })) windower.push(line);
      const end = windower.end();
      return { windows, end, calls: tok.calls, longest: tok.longest };
    };
    const small = 'Short text.\n\nTwo paragraphs.\n';
    const whole = await run(small);
    expect(whole.calls).toBe(1);
    expect(whole.windows.flat()).toEqual(fakeTokenizer().encode(small));

    const big = `${'One paragraph here.\nSecond line of it.\n\n'.repeat(10)}End.`;
    const want = await run(big);
    expect(want.calls).toBeGreaterThan(5);
    expect(want.longest).toBeLessThanOrEqual(32);
    // BOS once, then every character's id: the fake tokenizer has no effect at the cuts.
    expect(want.windows.flat()).toEqual(fakeTokenizer().encode(big));
    expect(want.windows.slice(0, -1).every((w) => w.length === 8)).toBe(true);
    expect(want.end.tokens).toBe(big.length + 1);
    for (const size of [1, 5, 64]) expect(await run(chunked(encoder.encode(big), size))).toEqual(want);
  });
});

describe('tens of megabytes, streamed', () => {
  /** A stream that makes `total` bytes of `line` repeated only as it is read, counting what was pulled. */
  function generated(line: string, total: number) {
    const block = encoder.encode(line.repeat(Math.max(1, Math.floor(65536 / line.length))));
    const counter = { pulled: 0 };
    const stream = new ReadableStream<Uint8Array>(
      {
        pull(controller) {
          if (counter.pulled >= total) return controller.close();
          controller.enqueue(block.slice());
          counter.pulled += block.length;
        },
      },
      { highWaterMark: 0 },
    );
    return { stream, counter, bytes: Math.ceil(total / block.length) * block.length };
  }

  it('JSONL: tokenized while it is read, one line at a time', async () => {
    const line = `${JSON.stringify({ text: 'Once upon a time, a small cat sat in the sun and was happy. '.repeat(16) })}\n`;
    const { stream, counter, bytes } = generated(line, 40 * 2 ** 20);
    const tok = fakeTokenizer(8); // about as many tokens as a real tokenizer gives, so the examples stay small
    let pulledAtFirstEncode = -1;
    const encode = tok.encode.bind(tok);
    tok.encode = (text, options) => {
      if (pulledAtFirstEncode === -1) pulledAtFirstEncode = counter.pulled;
      return encode(text, options);
    };
    const progress: { done: number; total: number }[] = [];
    const data = await readDataset(tok, stream, { file: 'big.jsonl', seq: 128, onProgress: (p) => progress.push(p) });
    expect(data.train.length).toBe(bytes / line.length);
    expect(pulledAtFirstEncode).toBeLessThanOrEqual(2 * 65536);
    expect(tok.longest).toBeLessThan(line.length);
    expect(progress.at(-1)).toEqual({ done: bytes, total: bytes });
  }, 120_000);

  it('plain text as a Blob: pieces stay bounded, even on one giant line', async () => {
    const paragraphs = new Blob(Array.from({ length: 30 }, () => 'The cat sat.\nThe dog ran.\n\n'.repeat(40_000)));
    expect(paragraphs.size).toBeGreaterThan(30 * 2 ** 20);
    const tok = fakeTokenizer(8);
    const progress: { done: number; total: number }[] = [];
    const data = await readDataset(tok, paragraphs, { file: 'big.txt', seq: 512, onProgress: (p) => progress.push(p) });
    expect(tok.longest).toBeLessThanOrEqual(2 * 2 ** 20);
    expect(data.stats.tokens / (paragraphs.size / 8)).toBeCloseTo(1, 3); // ASCII: a token per 8 bytes
    expect(progress.at(-1)).toEqual({ done: paragraphs.size, total: paragraphs.size });

    const oneLine = new Blob(Array.from({ length: 10 }, () => 'word '.repeat(200_000)));
    const tok2 = fakeTokenizer(8);
    const data2 = await readDataset(tok2, oneLine, { file: 'line.txt', seq: 512 });
    expect(tok2.longest).toBeLessThanOrEqual(2 * 2 ** 20);
    expect(data2.stats.tokens / (oneLine.size / 8)).toBeCloseTo(1, 3);
  }, 120_000);
});
