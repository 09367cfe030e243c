/**
 * JSONL parsing: the four formats, blank lines, line endings, and one DataError per bad line
 * (test/fixtures/data/broken.jsonl) naming the file, the 1-based line and what is wrong.
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { DataError } from '../src/data/errors.js';
import { parseJsonl, readJsonl } from '../src/data/jsonl.js';
import { detectFormat } from '../src/data/load.js';

const here = dirname(fileURLToPath(import.meta.url));
const fixture = (name: string) => readFile(resolve(here, 'fixtures/data', name), 'utf8');

describe('broken.jsonl', () => {
  /** Line -> a fragment of its reason. Lines 1 and 19 are valid; 8 and 13 are blank. */
  const EXPECTED: [number, RegExp][] = [
    [2, /^not valid JSON \(/],
    [3, /^"text" is empty$/],
    [4, /^expected a JSON object, got a list$/],
    [5, /^has none of the formats: .*found keys "txt"$/],
    [6, /^mixes formats \("text", "prompt", "completion"\)/],
    [7, /^has "prompt" but no "completion"$/],
    [9, /no message with role "assistant"/],
    [10, /^messages\[0\]\.content must be a string, got a list$/],
    [11, /^not valid JSON/],
    [12, /^"text" must be a string, got a number \(42\)$/],
    [14, /^"text" is empty \(only whitespace\)$/],
    [15, /^"messages" is empty$/],
    [16, /^"completion" is empty$/],
    [17, /^messages\[0\]\.role must be a non-empty string, got nothing$/],
    [18, /^expected a JSON object, got null$/],
  ];

  it('reports every bad line with its number and reason, and keeps the valid ones', async () => {
    const { records, errors, blankLines } = readJsonl(await fixture('broken.jsonl'), 'broken.jsonl');
    expect(blankLines).toBe(2);
    expect(records.map((r) => [r.line, r.format])).toEqual([
      [1, 'text'],
      [19, 'prompt-completion'],
    ]);
    expect(errors.map((e) => e.line)).toEqual(EXPECTED.map(([line]) => line));
    errors.forEach((error, i) => {
      const [line, reason] = EXPECTED[i]!;
      expect(error).toBeInstanceOf(DataError);
      expect(error.file).toBe('broken.jsonl');
      expect(error.reason).toMatch(reason);
      expect(error.message).toBe(`broken.jsonl, line ${line}: ${error.reason}`);
    });
    // The JSON parser's own message is kept as the cause.
    expect(errors[0]!.cause).toBeInstanceOf(SyntaxError);
  });

  it('parseJsonl throws the first bad line', async () => {
    const text = await fixture('broken.jsonl');
    expect(() => parseJsonl(text, 'data/broken.jsonl')).toThrow(DataError);
    expect(() => parseJsonl(text, 'data/broken.jsonl')).toThrow(/^data\/broken\.jsonl, line 2: not valid JSON/);
  });
});

describe('valid files', () => {
  it('text.jsonl: blank lines skipped, metadata keys ignored, CRLF accepted', async () => {
    const { records, errors, blankLines } = readJsonl(await fixture('text.jsonl'), 'text.jsonl');
    expect(errors).toEqual([]);
    expect(blankLines).toBe(2);
    expect(records.map((r) => r.line)).toEqual([1, 3, 4, 6, 7]);
    expect(records[1]).toEqual({ format: 'text', line: 3, text: 'The sun was warm.\nThe birds sang.' });
    expect(records[4]).toEqual({ format: 'text', line: 7, text: '  leading and trailing spaces  ' });
  });

  it('prompt_completion.jsonl and chat files parse into their formats', async () => {
    const pc = parseJsonl(await fixture('prompt_completion.jsonl'), 'pc.jsonl');
    expect(pc.map((r) => r.format)).toEqual(Array(5).fill('prompt-completion'));
    expect(pc[1]).toEqual({
      format: 'prompt-completion',
      line: 2,
      prompt: '',
      completion: 'An unconditional completion.',
    });
    const chat = parseJsonl(await fixture('chat_multiturn.jsonl'), 'chat.jsonl');
    expect(chat.map((r) => r.format)).toEqual(['messages', 'messages']);
    expect(chat[1]!.format === 'messages' && chat[1]!.messages.map((m) => m.role)).toEqual([
      'user',
      'assistant',
      'user',
      'assistant',
      'user',
    ]);
  });

  it('a byte-order mark, no final newline, CRLF, and extra message fields', () => {
    const text =
      '\uFEFF{"text": "a"}\r\n\r\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "reasoning_content": "r"}]}';
    const records = parseJsonl(text, 'x.jsonl');
    expect(records.map((r) => r.line)).toEqual([1, 3]);
    expect(records[0]).toEqual({ format: 'text', line: 1, text: 'a' });
    const m = records[1]!;
    expect(m.format === 'messages' && m.messages[1]).toEqual({
      role: 'assistant',
      content: '',
      reasoning_content: 'r',
    });
  });

  it('an empty file, or one of blank lines only, is an error without a line', () => {
    for (const text of ['', '\n\n', '  \r\n']) {
      const { records, errors } = readJsonl(text, 'empty.jsonl');
      expect(records).toEqual([]);
      expect(errors).toHaveLength(1);
      expect(errors[0]!.line).toBeUndefined();
      expect(errors[0]!.message).toMatch(/^empty\.jsonl: has no records/);
    }
  });

  it('detectFormat picks the format by file name', () => {
    expect(detectFormat('train.jsonl')).toBe('jsonl');
    expect(detectFormat('x/y/TRAIN.NDJSON')).toBe('jsonl');
    expect(detectFormat('book.txt')).toBe('text');
    expect(detectFormat('notes')).toBe('text');
    expect(detectFormat('alpaca_data.json')).toBe('json');
    expect(detectFormat('pairs.CSV')).toBe('csv');
    expect(detectFormat('pairs.tsv')).toBe('tsv');
  });
});
