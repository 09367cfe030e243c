// readDataset: every format read as a stream and tokenized as it goes gives the same examples as
// the whole-content functions (whose ids are checked against transformers in
// data-examples.cpu.test.ts); CSV/TSV and Alpaca; the seeded split by record; progress and abort;
// skipped bad lines; every kind of bad input named; a text bigger than one piece.
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadTokenizerFromDirectory, type Tokenizer } from '@webtune/models';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  ALPACA_PROMPT_NO_INPUT,
  alpacaPrompt,
  DataError,
  type Example,
  IGNORE_INDEX,
  parseJsonl,
  readDataset,
  readJsonl,
  TEXT_CHUNK,
  textWindows,
  tokenizeRecords,
} from '../src/data/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../../..');
const fixture = (name: string) => readFile(resolve(here, 'fixtures/data', name), 'utf8');
let stories: Tokenizer;
let qwen3: Tokenizer;

beforeAll(async () => {
  stories = await loadTokenizerFromDirectory(resolve(root, 'apps/studio/public/models/stories260K'));
  qwen3 = await loadTokenizerFromDirectory(resolve(root, 'packages/models/test/fixtures/tokenizers/qwen3'));
}, 60_000);

const ids = (examples: readonly Example[]) => examples.map((e) => [...e.inputIds]);
const labels = (examples: readonly Example[]) => examples.map((e) => [...e.labels]);

/** The same bytes as a string, a Blob and a stream in awkward 7-byte chunks. */
function sources(text: string): [string, string | Blob | ReadableStream<Uint8Array>][] {
  const bytes = new TextEncoder().encode(text);
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      for (let i = 0; i < bytes.length; i += 7) controller.enqueue(bytes.slice(i, i + 7));
      controller.close();
    },
  });
  return [
    ['string', text],
    ['Blob', new Blob([bytes])],
    ['stream', stream],
  ];
}

async function failure(promise: Promise<unknown>): Promise<DataError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(DataError);
  return error as DataError;
}

describe('readDataset', () => {
  it('reads plain text exactly as textWindows does, from a string, a Blob or a stream', async () => {
    const text = `${(await fixture('text.jsonl')).repeat(3)}\r\nline with a CRLF\r\nand é, 日本語 🙂\n`;
    const want = textWindows(stories, text, 24).examples;
    for (const [kind, source] of sources(text)) {
      const data = await readDataset(stories, source, { file: 'notes.txt', seq: 24 });
      expect(data.format, kind).toBe('text');
      expect(ids(data.train), kind).toEqual(ids(want));
      expect(labels(data.train), kind).toEqual(labels(want));
      expect(data.stats.records).toBe(want.length);
    }
  });

  it('reads JSONL line by line as parseJsonl + tokenizeRecords do', async () => {
    for (const name of ['text.jsonl', 'prompt_completion.jsonl']) {
      const text = await fixture(name);
      const want = tokenizeRecords(stories, parseJsonl(text, name), { seq: 64, file: name });
      for (const [kind, source] of sources(text)) {
        const data = await readDataset(stories, source, { file: name, seq: 64 });
        expect(ids(data.train), `${name} ${kind}`).toEqual(ids(want.examples));
        expect(labels(data.train), `${name} ${kind}`).toEqual(labels(want.examples));
        expect(data.droppedLines).toEqual(want.droppedLines);
      }
    }
  });

  it('trains Alpaca records on the output, prompted by Alpaca’s template', async () => {
    const text = [
      JSON.stringify({ instruction: 'Name a colour.', input: '', output: 'Blue.' }),
      JSON.stringify({ instruction: 'Add the numbers.', input: '2 and 3', output: '5' }),
    ].join('\n');
    const data = await readDataset(stories, text, { file: 'alpaca.jsonl', seq: 512 });
    expect(data.train).toHaveLength(2);
    const first = alpacaPrompt({ instruction: 'Name a colour.', input: '', output: 'Blue.' });
    expect(first.prompt).toBe(ALPACA_PROMPT_NO_INPUT.replace('{instruction}', 'Name a colour.'));
    const promptIds = stories.encode(first.prompt);
    const e = data.train[0] as Example;
    expect([...e.inputIds.slice(0, promptIds.length)]).toEqual(promptIds);
    expect(e.labels.slice(0, promptIds.length).every((l) => l === IGNORE_INDEX)).toBe(true);
    expect(stories.decode([...e.inputIds.slice(promptIds.length)], { skipSpecialTokens: true })).toBe('Blue.');
    expect(stories.decode([...(data.train[1] as Example).inputIds])).toContain('### Input:\n2 and 3');
    expect(data.stats.byFormat.alpaca).toBe(2);
  });

  it('reads CSV and TSV with quoted fields, by chosen or usual column names', async () => {
    const csv = [
      'id,prompt,completion',
      '1,"Say ""hi"", please",Hi!',
      '2,"A prompt over',
      'two lines",Done.',
      '',
      '3,Plain,Yes',
    ].join('\r\n');
    const data = await readDataset(stories, csv, { file: 'pairs.csv', seq: 64 });
    const want = tokenizeRecords(
      stories,
      [
        { format: 'prompt-completion', line: 2, prompt: 'Say "hi", please', completion: 'Hi!' },
        { format: 'prompt-completion', line: 3, prompt: 'A prompt over\ntwo lines', completion: 'Done.' },
        { format: 'prompt-completion', line: 6, prompt: 'Plain', completion: 'Yes' },
      ],
      { seq: 64, file: 'pairs.csv' },
    );
    expect(ids(data.train)).toEqual(ids(want.examples));
    expect(data.train.map((e) => e.line)).toEqual([2, 3, 6]);
    const tsv = 'question\tanswer\nWhat is 2+2?\tfour\n';
    const chosen = await readDataset(stories, new Blob([tsv]), {
      file: 'qa.tsv',
      seq: 64,
      columns: { prompt: 'question', completion: 'answer' },
    });
    expect(chosen.train).toHaveLength(1);
    const missing = await failure(readDataset(stories, tsv, { file: 'qa.tsv', seq: 64, columns: { text: 'body' } }));
    expect(missing.message).toBe('qa.tsv, line 1: has no column "body"; its columns are "question", "answer"');
    const unknown = await failure(readDataset(stories, tsv, { file: 'qa.tsv', seq: 64 }));
    expect(unknown.message).toMatch(/has none of the columns .* its columns are "question", "answer"/);
    const ragged = await failure(readDataset(stories, 'text\nok\n"a",b\n', { file: 'r.csv', seq: 64 }));
    expect(ragged.message).toBe('r.csv, line 3: has 2 fields; the header has 1');
    const open = await failure(readDataset(stories, 'text\n"never closed\nmore\n', { file: 'o.csv', seq: 64 }));
    expect(open.message).toMatch(/o\.csv, line 2: a quoted field opened here is never closed/);
  });

  it('holds out whole records for validation, the same for a seed and differently across seeds', async () => {
    const text = await fixture('chat_multiturn.jsonl');
    const many = Array.from({ length: 10 }, () => text.trim()).join('\n');
    const chat = { assistantLoss: 'split' as const };
    const a = await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat, validation: 0.3, seed: 1 });
    const b = await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat, validation: 0.3, seed: 1 });
    const c = await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat, validation: 0.3, seed: 2 });
    expect(a.stats.records).toBe(many.split('\n').length);
    expect(ids(a.validation)).toEqual(ids(b.validation));
    expect(a.fingerprint).toBe(b.fingerprint);
    expect(a.validation.map((e) => e.line)).not.toEqual(c.validation.map((e) => e.line));
    // A record split into one example per assistant turn stays on one side.
    const trainLines = new Set(a.train.map((e) => e.line));
    for (const e of a.validation) expect(trainLines.has(e.line)).toBe(false);
    expect(new Set(a.validation.map((e) => e.line)).size).toBe(Math.round(0.3 * a.stats.records));
    expect(a.stats.validation).toBe(a.validation.length);
    expect(a.train.length + a.validation.length).toBe(
      (await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat })).train.length,
    );
  });

  it('reports progress to the total and aborts promptly', async () => {
    const text = (await fixture('text.jsonl')).repeat(200);
    const blob = new Blob([text]);
    const seen: { done: number; total: number }[] = [];
    await readDataset(stories, blob, { file: 'a.jsonl', seq: 64, onProgress: (p) => seen.push(p) });
    expect(seen.at(-1)).toEqual({ done: blob.size, total: blob.size });
    const controller = new AbortController();
    controller.abort(new DOMException('stop', 'AbortError'));
    await expect(readDataset(stories, blob, { file: 'a.jsonl', seq: 64, signal: controller.signal })).rejects.toThrow(
      'stop',
    );
  });

  it('skips and counts bad lines on request, else stops at the first with its line', async () => {
    const text = await fixture('broken.jsonl');
    const { errors } = readJsonl(text, 'broken.jsonl');
    const first = await failure(readDataset(stories, text, { file: 'broken.jsonl', seq: 64 }));
    expect(first.line).toBe(errors[0]?.line);
    expect(first.message).toBe(errors[0]?.message);
    const data = await readDataset(stories, text, { file: 'broken.jsonl', seq: 64, skipBadLines: true });
    expect(data.stats.badLines).toBe(errors.length);
    expect(data.badLines.map((b) => b.line)).toEqual(errors.map((e) => e.line));
    expect(data.train.length).toBeGreaterThan(0);
  });

  it('names every kind of bad input', async () => {
    const notUtf8 = new Uint8Array([...new TextEncoder().encode('{"text": "ok"}\n{"text": "'), 0xff, 0xfe, 0x22, 0x7d]);
    const bad = await failure(readDataset(stories, new Blob([notUtf8]), { file: 'x.jsonl', seq: 64 }));
    expect(bad.message).toBe(
      'x.jsonl, line 2: is not UTF-8 text (invalid bytes at byte offset 25 of the file); save the file as UTF-8',
    );
    expect((await failure(readDataset(stories, '\n\n', { file: 'e.jsonl', seq: 64 }))).message).toBe(
      'e.jsonl: is empty: no example to train on',
    );
    expect((await failure(readDataset(stories, '   \n', { file: 'e.txt', seq: 64 }))).message).toBe('e.txt: is empty');
    const long = JSON.stringify({ prompt: 'word '.repeat(100), completion: 'end' });
    expect((await failure(readDataset(stories, long, { file: 'l.jsonl', seq: 16 }))).message).toMatch(
      /l\.jsonl: no example has a trained token within 16 tokens/,
    );
    await expect(readDataset(stories, 'x', { file: 'x', seq: 16, format: 'parquet' as never })).rejects.toThrow(
      /unknown format "parquet"/,
    );
    expect((await failure(readDataset(stories, 'text\n', { file: 'h.csv', seq: 16 }))).message).toMatch(
      /h\.csv: is empty: no example/,
    );
  });

  it('tokenizes a text bigger than one piece at paragraph breaks, streaming', async () => {
    const paragraph = 'Once upon a time there was a little cat. The cat liked to sleep in the sun.\nIt was happy.\n\n';
    const chunk = 64 * 1024; // TEXT_CHUNK is 8 MiB; a small piece keeps the test quick
    expect(TEXT_CHUNK).toBe(8 * 2 ** 20);
    const copies = Math.ceil((chunk * 3.5) / paragraph.length);
    const text = paragraph.repeat(copies);
    const blob = new Blob([text]);
    const data = await readDataset(stories, blob, { file: 'big.txt', seq: 256, textChunk: chunk });
    // Only the tokens at the few piece boundaries may differ from tokenizing the whole text.
    const whole = stories.encode(text).length;
    const total = data.train.reduce((n, e) => n + e.inputIds.length, 0);
    const pieces = Math.ceil(text.length / chunk);
    expect(Math.abs(total - whole)).toBeLessThanOrEqual(2 * pieces);
    expect(total).not.toBe(0);
    expect(data.train.every((e, i) => i === data.train.length - 1 || e.inputIds.length === 256)).toBe(true);
    expect(data.stats.records).toBe(data.train.length);
  }, 120_000);
});
