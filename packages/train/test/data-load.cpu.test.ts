// readDataset with real tokenizers (stories260K, and Qwen3's for chat templates): every format read
// as a stream and tokenized as it goes gives the same examples as the whole-content path (whose
// ids are checked against transformers in data-examples.cpu.test.ts); Alpaca's mapping; CSV/TSV;
// the seeded split by record; packing; progress and abort; skipped bad lines; every kind of bad
// input named; a text bigger than one piece.
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadTokenizerFromDirectory, type Tokenizer } from '@webtune/models';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  ALPACA_PROMPT_NO_INPUT,
  ALPACA_PROMPT_WITH_INPUT,
  alpacaPrompt,
  BAD_LINES_KEPT,
  DataError,
  type Example,
  fingerprintExamples,
  IGNORE_INDEX,
  parseJsonl,
  prepareDataset,
  type ReadDatasetOptions,
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
const lines = (examples: readonly Example[]) => examples.map((e) => e.line);

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

/** A CSV field, quoted when it must be. */
const csvField = (value: string) => (/[",\n\r]/.test(value) ? `"${value.replaceAll('"', '""')}"` : value);

describe('readDataset: formats', () => {
  it('reads plain text exactly as textWindows does, from a string, a Blob or a stream', async () => {
    const text = `${(await fixture('text.jsonl')).repeat(3)}\r\nline with a CRLF\r\nand é, 日本語 🙂\n\uFEFFa mark inside\n`;
    const want = textWindows(stories, text, 24).examples;
    for (const [kind, source] of sources(text)) {
      const data = await readDataset(stories, source, { file: 'notes.txt', seq: 24 });
      expect(data.format, kind).toBe('text');
      expect(ids(data.train), kind).toEqual(ids(want));
      expect(labels(data.train), kind).toEqual(labels(want));
      expect(data.stats.records).toBe(want.length);
    }
    // A byte-order mark at the very start is not text.
    const marked = await readDataset(stories, `\uFEFF${text}`, { file: 'notes.txt', seq: 24 });
    expect(ids(marked.train)).toEqual(ids(want));
  });

  it('reads every JSONL format line by line as parseJsonl + tokenizeRecords do, and as prepareDataset does', async () => {
    const cases: [string, Tokenizer, ReadDatasetOptions['chat']][] = [
      ['text.jsonl', stories, undefined],
      ['prompt_completion.jsonl', stories, undefined],
      ['chat.jsonl', qwen3, undefined],
      ['chat_multiturn.jsonl', qwen3, { assistantLoss: 'split' }],
    ];
    for (const [name, tokenizer, chat] of cases) {
      const text = await fixture(name);
      const want = tokenizeRecords(tokenizer, parseJsonl(text, name), {
        seq: 64,
        file: name,
        ...(chat ? { chat } : {}),
      });
      expect(want.examples.length).toBeGreaterThan(0);
      const whole = prepareDataset(tokenizer, text, { file: name, seq: 64, ...(chat ? { chat } : {}) });
      expect(ids(whole.examples), name).toEqual(ids(want.examples));
      for (const [kind, source] of sources(text)) {
        const data = await readDataset(tokenizer, source, { file: name, seq: 64, ...(chat ? { chat } : {}) });
        expect(ids(data.train), `${name} ${kind}`).toEqual(ids(want.examples));
        expect(labels(data.train), `${name} ${kind}`).toEqual(labels(want.examples));
        expect(lines(data.train), `${name} ${kind}`).toEqual(lines(want.examples));
        expect(data.droppedLines).toEqual(want.droppedLines);
        expect(data.fingerprint).toBe(fingerprintExamples(whole.examples)); // no split: train alone
      }
    }
  });

  it('reads a .json array of records (one line or pretty-printed) as the same records in JSON Lines', async () => {
    const text = await fixture('prompt_completion.jsonl');
    const records = text
      .split('\n')
      .filter((l) => l.trim() !== '')
      .map((l) => JSON.parse(l) as unknown);
    const want = await readDataset(stories, text, { file: 'pc.jsonl', seq: 64 });
    for (const json of [JSON.stringify(records), JSON.stringify(records, null, 4)]) {
      for (const [kind, source] of sources(json)) {
        const data = await readDataset(stories, source, { file: 'pc.json', seq: 64 });
        expect(data.format, kind).toBe('json');
        expect(ids(data.train), kind).toEqual(ids(want.train));
        expect(labels(data.train), kind).toEqual(labels(want.train));
      }
    }
    const pretty = await readDataset(stories, JSON.stringify(records, null, 4), { file: 'pc.json', seq: 64 });
    expect(lines(pretty.train)).toEqual(records.map((_, i) => 2 + 4 * i).filter((_, i) => i !== 3)); // the 4th is dropped
    // A .json file of JSON Lines (what Hugging Face datasets' to_json writes) is read as JSON Lines.
    const jsonl = await readDataset(stories, text, { file: 'pc.json', seq: 64 });
    expect(jsonl.format).toBe('jsonl');
    expect(ids(jsonl.train)).toEqual(ids(want.train));
  });

  it('trains Alpaca records on the output, prompted by the documented template', async () => {
    const records = [
      { instruction: 'Name a colour.', input: '', output: 'Blue.' },
      { instruction: 'Add the numbers.', input: '2 and 3', output: '5' },
      { instruction: 'Fill {input} with $& here.', output: 'Done.' },
    ];
    const text = records.map((r) => JSON.stringify(r)).join('\n');
    const data = await readDataset(stories, text, { file: 'alpaca.jsonl', seq: 512 });
    expect(data.train).toHaveLength(3);
    expect(data.stats.byFormat.alpaca).toBe(3);
    const first = alpacaPrompt(records[0]!);
    expect(first).toEqual({
      prompt: ALPACA_PROMPT_NO_INPUT.replace('{instruction}', 'Name a colour.'),
      completion: 'Blue.',
    });
    expect(first.prompt.endsWith('### Response:\n')).toBe(true);
    const promptIds = stories.encode(first.prompt);
    const e = data.train[0] as Example;
    expect([...e.inputIds.slice(0, promptIds.length)]).toEqual(promptIds);
    expect(e.labels.slice(0, promptIds.length).every((l) => l === IGNORE_INDEX)).toBe(true);
    expect(stories.decode([...e.inputIds.slice(promptIds.length)], { skipSpecialTokens: true })).toBe('Blue.');
    expect(alpacaPrompt(records[1]!).prompt).toBe(
      ALPACA_PROMPT_WITH_INPUT.replace('{instruction}', 'Add the numbers.').replace('{input}', '2 and 3'),
    );
    // One pass over the template, as Python's format_map: the user's "{input}" and "$&" stay as written.
    expect(alpacaPrompt(records[2]!).prompt).toContain(
      '### Instruction:\nFill {input} with $& here.\n\n### Response:\n',
    );
    // Only an empty (or absent) input picks the template without one, as Stanford's `!= ""`.
    expect(alpacaPrompt({ instruction: 'x', input: ' ', output: 'y' }).prompt).toContain('### Input:\n \n\n');
    // The same records as CSV columns.
    const csv = [
      'instruction,input,output',
      ...records.map((r) => [r.instruction, r.input ?? '', r.output].map(csvField).join(',')),
    ].join('\n');
    const fromCsv = await readDataset(stories, csv, { file: 'alpaca.csv', seq: 512 });
    expect(ids(fromCsv.train)).toEqual(ids(data.train));
    expect(lines(fromCsv.train)).toEqual([2, 3, 4]);
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
    const want = tokenizeRecords(
      stories,
      [
        { format: 'prompt-completion', line: 2, prompt: 'Say "hi", please', completion: 'Hi!' },
        { format: 'prompt-completion', line: 3, prompt: 'A prompt over\ntwo lines', completion: 'Done.' },
        { format: 'prompt-completion', line: 6, prompt: 'Plain', completion: 'Yes' },
      ],
      { seq: 64, file: 'pairs.csv' },
    );
    for (const [kind, source] of sources(csv)) {
      const data = await readDataset(stories, source, { file: 'pairs.csv', seq: 64 });
      expect(ids(data.train), kind).toEqual(ids(want.examples));
      expect(lines(data.train), kind).toEqual([2, 3, 6]);
    }
    expect(ids(prepareDataset(stories, csv, { file: 'pairs.csv', seq: 64 }).examples)).toEqual(ids(want.examples));
    const tsv = 'question\tanswer\nWhat is 2+2?\tfour\n';
    const chosen = await readDataset(stories, new Blob([tsv]), {
      file: 'qa.tsv',
      seq: 64,
      columns: { prompt: 'question', completion: 'answer' },
    });
    expect(chosen.train).toHaveLength(1);
    expect(chosen.format).toBe('tsv');
    const texts = await readDataset(stories, 'id,text\n1,Once upon a time.\n2,"A cat, a dog."\n', {
      file: 't.csv',
      seq: 64,
    });
    expect(ids(texts.train)).toEqual(
      ids(
        tokenizeRecords(
          stories,
          [
            { format: 'text', line: 2, text: 'Once upon a time.' },
            { format: 'text', line: 3, text: 'A cat, a dog.' },
          ],
          { seq: 64, file: 't.csv' },
        ).examples,
      ),
    );
  });
});

describe('readDataset: split, packing, progress, abort', () => {
  it('holds out whole records for validation, the same for a seed and differently across seeds', async () => {
    const text = await fixture('chat_multiturn.jsonl');
    const many = Array.from({ length: 10 }, () => text.trim()).join('\n');
    const chat = { assistantLoss: 'split' as const };
    const a = await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat, validation: 0.3, seed: 1 });
    const [, blob] = sources(many)[1]!;
    const b = await readDataset(qwen3, blob, { file: 'c.jsonl', seq: 512, chat, validation: 0.3, seed: 1 });
    const c = await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat, validation: 0.3, seed: 2 });
    expect(a.stats.records).toBe(many.split('\n').length);
    expect(ids(a.validation)).toEqual(ids(b.validation));
    expect(a.fingerprint).toBe(b.fingerprint);
    expect(lines(a.validation)).not.toEqual(lines(c.validation));
    expect(a.fingerprint).not.toBe(c.fingerprint);
    // A record split into one example per assistant turn stays on one side.
    for (const data of [a, c]) {
      const trainLines = new Set(lines(data.train));
      for (const e of data.validation) expect(trainLines.has(e.line)).toBe(false);
      expect(new Set(lines(data.validation)).size).toBe(Math.round(0.3 * data.stats.records));
    }
    expect(a.validation.some((e) => e.turn !== undefined && e.turn > 1)).toBe(true);
    expect(a.stats.validation).toBe(a.validation.length);
    expect(a.stats.validationTokens).toBe(a.validation.reduce((n, e) => n + e.inputIds.length, 0));
    const all = await readDataset(qwen3, many, { file: 'c.jsonl', seq: 512, chat });
    expect(a.train.length + a.validation.length).toBe(all.train.length);
    expect(all.validation).toEqual([]);
  });

  it('packs {"text"} records into full windows on each side of the split, as prepareDataset does', async () => {
    const text = await fixture('text.jsonl');
    const packed = await readDataset(stories, text, { file: 'text.jsonl', seq: 16, pack: true });
    expect(ids(packed.train)).toEqual(
      ids(prepareDataset(stories, text, { file: 'text.jsonl', seq: 16, pack: true }).examples),
    );
    expect(packed.train.slice(0, -1).every((e) => e.inputIds.length === 16)).toBe(true);
    const split = await readDataset(stories, text, {
      file: 'text.jsonl',
      seq: 16,
      pack: true,
      validation: 0.4,
      seed: 3,
    });
    expect(split.validation.length).toBeGreaterThan(0);
    const pc = await fixture('prompt_completion.jsonl');
    expect((await failure(readDataset(stories, pc, { file: 'pc.jsonl', seq: 16, pack: true }))).message).toMatch(
      /pc\.jsonl, line 1: cannot be packed: a prompt-completion record has tokens without loss/,
    );
  });

  it('reports progress to done == total, for a stream too (its total known at the end)', async () => {
    const text = (await fixture('text.jsonl')).repeat(50);
    for (const [kind, source] of sources(text)) {
      const seen: { done: number; total: number }[] = [];
      await readDataset(stories, source, { file: 'a.jsonl', seq: 64, onProgress: (p) => seen.push(p) });
      const size = new TextEncoder().encode(text).length;
      expect(seen.at(-1), kind).toEqual({ done: size, total: size });
      for (let i = 1; i < seen.length; i++) expect(seen[i]!.done).toBeGreaterThanOrEqual(seen[i - 1]!.done);
    }
  });

  it('rejects with the signal’s reason when aborted before or while reading', async () => {
    const text = (await fixture('text.jsonl')).repeat(400);
    const blob = new Blob([text]);
    const before = new AbortController();
    before.abort(new DOMException('stop', 'AbortError'));
    await expect(readDataset(stories, blob, { file: 'a.jsonl', seq: 64, signal: before.signal })).rejects.toThrow(
      'stop',
    );
    const during = new AbortController();
    let calls = 0;
    const reading = readDataset(stories, blob, {
      file: 'a.jsonl',
      seq: 64,
      signal: during.signal,
      onProgress: () => {
        if (++calls === 1) setTimeout(() => during.abort(), 0);
      },
    });
    await expect(reading).rejects.toMatchObject({ name: 'AbortError' });
  });
});

describe('readDataset: bad input', () => {
  it('skips and counts bad lines on request, else stops at the first with its line', async () => {
    const text = await fixture('broken.jsonl');
    const { errors } = readJsonl(text, 'broken.jsonl');
    const first = await failure(readDataset(stories, text, { file: 'broken.jsonl', seq: 64 }));
    expect(first.line).toBe(errors[0]?.line);
    expect(first.message).toBe(errors[0]?.message);
    const data = await readDataset(stories, text, { file: 'broken.jsonl', seq: 64, skipBadLines: true });
    expect(data.stats.badLines).toBe(errors.length);
    expect(data.badLines).toEqual(errors.map((e) => ({ line: e.line, reason: e.reason })));
    expect(data.train.length).toBe(2);
    // All are counted; the first BAD_LINES_KEPT are listed.
    const many = `${'{"text": 1}\n'.repeat(BAD_LINES_KEPT + 20)}{"text": "ok"}\n`;
    const skipped = await readDataset(stories, many, { file: 'm.jsonl', seq: 64, skipBadLines: true });
    expect(skipped.stats.badLines).toBe(BAD_LINES_KEPT + 20);
    expect(skipped.badLines).toHaveLength(BAD_LINES_KEPT);
    expect(skipped.badLines[0]).toEqual({ line: 1, reason: '"text" must be a string, got a number (1)' });
    // CSV rows and JSON elements too.
    const csv = 'prompt,completion\n"bad"x,1\nok,fine\nshort\nalso,\n';
    const rows = await readDataset(stories, csv, { file: 'r.csv', seq: 64, skipBadLines: true });
    expect(rows.badLines.map((b) => b.line)).toEqual([2, 4, 5]);
    expect(rows.badLines[1]?.reason).toBe('has 1 fields; the header has 2');
    expect(rows.badLines[2]?.reason).toBe('column "completion" is empty');
    expect(rows.train).toHaveLength(1);
    const json = '[\n{"text": "ok"},\n{"text": },\n{"text": "fine"}\n]';
    const elements = await readDataset(stories, json, { file: 'e.json', seq: 64, skipBadLines: true });
    expect(elements.badLines.map((b) => b.line)).toEqual([3]);
    expect(elements.badLines[0]?.reason).toMatch(/^not valid JSON/);
    expect(lines(elements.train)).toEqual([2, 4]);
  });

  it('names every kind of bad input', async () => {
    const notUtf8 = new Uint8Array([...new TextEncoder().encode('{"text": "ok"}\n{"text": "'), 0xff, 0xfe, 0x22, 0x7d]);
    const bad = await failure(readDataset(stories, new Blob([notUtf8]), { file: 'x.jsonl', seq: 64 }));
    expect(bad.message).toBe(
      'x.jsonl, line 2: is not UTF-8 text (invalid bytes at byte offset 25 of the file); save the file as UTF-8',
    );
    // Not skippable: a file in another encoding is wrong throughout.
    await failure(readDataset(stories, new Blob([notUtf8]), { file: 'x.jsonl', seq: 64, skipBadLines: true }));
    const malformed = await failure(
      readDataset(stories, '{"text": "a"}\n{"text": "b",}\n', { file: 'm.jsonl', seq: 64 }),
    );
    expect(malformed.message).toMatch(/^m\.jsonl, line 2: not valid JSON \(/);
    expect((await failure(readDataset(stories, '\n\n', { file: 'e.jsonl', seq: 64 }))).message).toBe(
      'e.jsonl: is empty: no example to train on',
    );
    expect((await failure(readDataset(stories, '   \n', { file: 'e.txt', seq: 64 }))).message).toBe('e.txt: is empty');
    expect((await failure(readDataset(stories, new Blob([]), { file: 'e.csv', seq: 64 }))).message).toBe(
      'e.csv: is empty (a CSV/TSV file needs a header row)',
    );
    expect((await failure(readDataset(stories, ' \n', { file: 'e.json', seq: 64 }))).message).toBe(
      'e.json: is empty: no example to train on',
    );
    expect((await failure(readDataset(stories, '[]', { file: 'e.json', seq: 64 }))).message).toBe(
      'e.json: is empty: no example to train on',
    );
    const long = JSON.stringify({ prompt: 'word '.repeat(100), completion: 'end' });
    expect((await failure(readDataset(stories, long, { file: 'l.jsonl', seq: 16 }))).message).toMatch(
      /l\.jsonl: no example has a trained token within 16 tokens/,
    );
    await expect(readDataset(stories, 'x', { file: 'x', seq: 16, format: 'parquet' as never })).rejects.toThrow(
      /x: unknown format "parquet"/,
    );
    expect((await failure(readDataset(stories, 'text\n', { file: 'h.csv', seq: 16 }))).message).toMatch(
      /h\.csv: is empty: no example/,
    );
    const tsv = 'question\tanswer\nWhat is 2+2?\tfour\n';
    const missing = await failure(readDataset(stories, tsv, { file: 'qa.tsv', seq: 64, columns: { text: 'body' } }));
    expect(missing.message).toBe('qa.tsv, line 1: has no column "body"; its columns are "question", "answer"');
    const twoMissing = await failure(
      readDataset(stories, tsv, { file: 'qa.tsv', seq: 64, columns: { prompt: 'q', completion: 'answer' } }),
    );
    expect(twoMissing.message).toBe('qa.tsv, line 1: has no column "q"; its columns are "question", "answer"');
    const unknown = await failure(readDataset(stories, tsv, { file: 'qa.tsv', seq: 64 }));
    expect(unknown.message).toMatch(/has none of the columns read by default .* its columns are "question", "answer"/);
    const ragged = await failure(readDataset(stories, 'text\nok\n"a",b\n', { file: 'r.csv', seq: 64 }));
    expect(ragged.message).toBe('r.csv, line 3: has 2 fields; the header has 1');
    const open = await failure(
      readDataset(stories, 'text\n"never closed\nmore\n', { file: 'o.csv', seq: 64, skipBadLines: true }),
    );
    expect(open.message).toBe('o.csv, line 2: a quoted field opened here is never closed (the file ends at line 3)');
    const notArray = await failure(readDataset(stories, '"text"', { file: 'n.json', seq: 64 }));
    expect(notArray.message).toMatch(/^n\.json, line 1: expected a JSON array of records/);
  });
});

describe('readDataset: big plain text', () => {
  it('tokenizes a text bigger than the whole-text limit in pieces, streaming', async () => {
    expect(TEXT_CHUNK).toBe(4 * 2 ** 20);
    const paragraph = 'Once upon a time there was a little cat. The cat liked to sleep in the sun.\nIt was happy.\n\n';
    const options = { file: 'big.txt', seq: 256, textChunk: 16 * 1024, textPiece: 4 * 1024 };
    const text = paragraph.repeat(Math.ceil((options.textChunk * 2.5) / paragraph.length));
    const data = await readDataset(stories, new Blob([text]), options);
    // Only the tokens at the few piece boundaries may differ from tokenizing the whole text.
    const whole = stories.encode(text).length;
    const total = data.train.reduce((n, e) => n + e.inputIds.length, 0);
    const pieces = Math.ceil(text.length / options.textPiece);
    expect(Math.abs(total - whole)).toBeLessThanOrEqual(2 * pieces);
    expect(data.train.every((e, i) => i === data.train.length - 1 || e.inputIds.length === 256)).toBe(true);
    expect(data.stats.records).toBe(data.train.length);
    // The pieces depend on the text only, not on how it arrives.
    const [, , stream] = sources(text);
    expect(ids((await readDataset(stories, stream![1], options)).train)).toEqual(ids(data.train));
    expect(ids(prepareDataset(stories, text, { file: 'big.txt', seq: 256 }).examples)).toEqual(
      ids(textWindows(stories, text, 256).examples),
    );
  }, 120_000);
});
