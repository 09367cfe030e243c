/**
 * Batching, the seeded shuffle, resuming from a cursor, held-out splits, packing, statistics and
 * the training estimate. Examples are made by hand (exact expectations), plus one run over a real
 * tokenizer and fixture through prepareDataset.
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadTokenizerFromDirectory } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import {
  type Batch,
  type DataCursor,
  DataLoader,
  fingerprintExamples,
  makeBatch,
  packExamples,
  padIdOf,
  splitHeldOut,
} from '../src/data/batches.js';
import { prepareDataset } from '../src/data/dataset.js';
import { DataError } from '../src/data/errors.js';
import { type Example, IGNORE_INDEX } from '../src/data/examples.js';
import { permutation } from '../src/data/random.js';
import { dataStats, estimateTraining } from '../src/data/stats.js';
import { Rng } from '../src/random.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../../..');

/** Example k: ids 100k+1 .. 100k+len; labels -100 on the first `masked` positions. */
function example(k: number, len: number, masked = 0): Example {
  const inputIds = Int32Array.from({ length: len }, (_, t) => 100 * k + t + 1);
  const labels = inputIds.slice();
  labels.fill(IGNORE_INDEX, 0, masked);
  return { inputIds, labels, format: masked > 0 ? 'prompt-completion' : 'text', line: k + 1 };
}

const EXAMPLES = Array.from({ length: 11 }, (_, k) => example(k, 2 + ((k * 5) % 7), k % 3));

/** Which example each row holds, read back from the ids (0 for an empty row). */
function rowsOf(batch: Batch): number[] {
  return Array.from({ length: batch.batch }, (_, r) =>
    batch.lengths[r] === 0 ? -1 : Math.floor((batch.inputIds[r * batch.seq]! - 1) / 100),
  );
}

describe('Rng and permutation', () => {
  it('xoshiro128** reproduces the reference test vector from state (1, 2, 3, 4)', () => {
    const rng = Rng.fromState([1, 2, 3, 4]);
    const out = Array.from({ length: 10 }, () => rng.nextU32());
    expect(out).toEqual([
      11520, 0, 5927040, 70819200, 2031721883, 1637235492, 1287239034, 3734860849, 3729100597, 4258142804,
    ]);
  });

  it('permutations are permutations, fixed by (seed, epoch), and differ between them', () => {
    const p = Array.from(permutation(50, 7, 0));
    expect([...p].sort((a, b) => a - b)).toEqual(Array.from({ length: 50 }, (_, i) => i));
    expect(Array.from(permutation(50, 7, 0))).toEqual(p);
    expect(Array.from(permutation(50, 7, 1))).not.toEqual(p);
    expect(Array.from(permutation(50, 8, 0))).not.toEqual(p);
    expect(Array.from(permutation(50, 2 ** 40 + 7, 0))).not.toEqual(p);
    expect(Array.from(permutation(1, 3, 3))).toEqual([0]);
    expect(Array.from(permutation(0, 3, 3))).toEqual([]);
    expect(() => permutation(5, -1, 0)).toThrow(RangeError);
    expect(() => permutation(5, 1.5, 0)).toThrow(RangeError);
  });

  it('every position is equally likely (chi-square over 6000 shuffles of 4)', () => {
    // counts[i][j]: how often element i lands at position j; 16 cells, 9 degrees of freedom.
    const counts = Array.from({ length: 4 }, () => new Array<number>(4).fill(0));
    const runs = 6000;
    for (let s = 0; s < runs; s++) {
      permutation(4, s, 0).forEach((element, position) => {
        counts[element]![position]!++;
      });
    }
    const expected = runs / 4;
    const chi2 = counts.flat().reduce((sum, c) => sum + (c - expected) ** 2 / expected, 0);
    expect(chi2).toBeLessThan(27.9); // p = 0.001 for 9 degrees of freedom
  });

  it('below(n) stays in range and rejects bad n', () => {
    const rng = new Rng(1);
    for (const n of [1, 2, 3, 1000, 2 ** 32]) {
      for (let i = 0; i < 50; i++) {
        const x = rng.below(n);
        expect(Number.isInteger(x) && x >= 0 && x < n).toBe(true);
      }
    }
    expect(() => rng.below(0)).toThrow(RangeError);
    expect(() => rng.below(2 ** 32 + 1)).toThrow(RangeError);
  });
});

describe('makeBatch', () => {
  it('right-pads rows with the pad id and -100 labels; counts tokens and predicted positions', () => {
    const b = makeBatch(EXAMPLES, [3, 0], { batch: 3, seq: 10, padId: 2 });
    expect([b.batch, b.seq, b.rows]).toEqual([3, 10, 2]);
    expect(b.inputIds.length).toBe(30);
    const e3 = EXAMPLES[3]!;
    const e0 = EXAMPLES[0]!;
    expect(Array.from(b.lengths)).toEqual([e3.inputIds.length, e0.inputIds.length, 0]);
    expect(Array.from(b.inputIds.subarray(0, 10))).toEqual([
      ...e3.inputIds,
      ...new Array(10 - e3.inputIds.length).fill(2),
    ]);
    expect(Array.from(b.labels.subarray(0, 10))).toEqual([
      ...e3.labels,
      ...new Array(10 - e3.labels.length).fill(IGNORE_INDEX),
    ]);
    expect(Array.from(b.inputIds.subarray(20))).toEqual(new Array(10).fill(2));
    expect(Array.from(b.labels.subarray(20))).toEqual(new Array(10).fill(IGNORE_INDEX));
    expect(b.tokens).toBe(e3.inputIds.length + e0.inputIds.length);
    // Example 3 masks none (3 % 3 = 0) and has 2 + 15 % 7 = 3 tokens: predicts 2; example 0: 2 tokens, predicts 1.
    expect(b.predicted).toBe(2 + 1);
  });

  it('refuses an example longer than seq and too many indices', () => {
    expect(() => makeBatch(EXAMPLES, [1], { batch: 1, seq: 4, padId: 0 })).toThrow(/more than the sequence length 4/);
    expect(() => makeBatch(EXAMPLES, [0, 1], { batch: 1, seq: 16, padId: 0 })).toThrow(RangeError);
    expect(() => makeBatch(EXAMPLES, [99], { batch: 1, seq: 16, padId: 0 })).toThrow(/out of range/);
  });

  it('padIdOf: pad token, else EOS, else 0', () => {
    expect(padIdOf({ padTokenId: 5, eosTokenIds: [2] })).toBe(5);
    expect(padIdOf({ padTokenId: undefined, eosTokenIds: [2, 3] })).toBe(2);
    expect(padIdOf({ padTokenId: undefined, eosTokenIds: [] })).toBe(0);
  });
});

describe('DataLoader', () => {
  const base = { batch: 4, seq: 8, padId: 0 };

  it('each epoch serves every example once in a seeded order; the last batch is completed with empty rows', () => {
    const loader = new DataLoader(EXAMPLES, { ...base, seed: 3, epochs: 3 });
    expect(loader.batchesPerEpoch).toBe(3);
    const batches = [...loader];
    expect(batches).toHaveLength(9);
    expect(loader.next()).toBeUndefined();
    const orders: number[][] = [];
    for (let e = 0; e < 3; e++) {
      const epoch = batches.slice(3 * e, 3 * e + 3);
      expect(epoch.map((b) => b.epoch)).toEqual([e, e, e]);
      expect(epoch.map((b) => b.lastOfEpoch)).toEqual([false, false, true]);
      expect(epoch.map((b) => b.rows)).toEqual([4, 4, 3]);
      const order = epoch.flatMap((b) => b.indices);
      expect(order).toEqual(Array.from(permutation(11, 3, e)));
      expect(epoch.flatMap(rowsOf).filter((k) => k >= 0)).toEqual(order);
      orders.push(order);
    }
    expect(orders[0]).not.toEqual(orders[1]);
    // The same seed gives the same batches, byte for byte.
    const again = [...new DataLoader(EXAMPLES, { ...base, seed: 3, epochs: 3 })];
    again.forEach((b, i) => {
      expect(b.inputIds).toEqual(batches[i]!.inputIds);
      expect(b.labels).toEqual(batches[i]!.labels);
    });
  });

  it('without shuffling, file order; with dropLast, whole batches only', () => {
    const plain = [...new DataLoader(EXAMPLES, { ...base, shuffle: false, epochs: 1 })];
    expect(plain.flatMap((b) => b.indices)).toEqual(Array.from({ length: 11 }, (_, i) => i));
    const dropped = new DataLoader(EXAMPLES, { ...base, dropLast: true, epochs: 2 });
    expect(dropped.batchesPerEpoch).toBe(2);
    const batches = [...dropped];
    expect(batches.map((b) => [b.epoch, b.rows, b.lastOfEpoch])).toEqual([
      [0, 4, false],
      [0, 4, true],
      [1, 4, false],
      [1, 4, true],
    ]);
    expect(() => new DataLoader(EXAMPLES.slice(0, 3), { ...base, dropLast: true })).toThrow(/leaves no batch/);
  });

  it('resumes exactly from a saved cursor, across epoch boundaries', () => {
    const options = { ...base, batch: 3, seed: 42 };
    const reference = new DataLoader(EXAMPLES, options);
    const expected = Array.from({ length: 12 }, () => reference.next()!);
    for (const stop of [0, 1, 3, 4, 7]) {
      const first = new DataLoader(EXAMPLES, options);
      let cursor: DataCursor = first.cursor;
      for (let i = 0; i < stop; i++) cursor = first.next()!.cursor;
      const saved = JSON.parse(JSON.stringify(cursor)) as DataCursor;
      const resumed = new DataLoader(EXAMPLES, { ...base, batch: 3, seed: 999, cursor: saved }); // the cursor's seed wins
      for (let i = stop; i < 12; i++) {
        const b = resumed.next()!;
        expect([b.epoch, ...b.indices], `stop ${stop}, batch ${i}`).toEqual([
          expected[i]!.epoch,
          ...expected[i]!.indices,
        ]);
        expect(b.inputIds).toEqual(expected[i]!.inputIds);
        expect(b.cursor).toEqual(expected[i]!.cursor);
      }
    }
    // 11 examples in batches of 3: the 4th batch ends epoch 0, so its cursor points at epoch 1, position 0.
    expect(expected[3]!.cursor).toMatchObject({ seed: 42, shuffle: true, epoch: 1, position: 0, examples: 11 });
    expect(expected[4]!.cursor).toMatchObject({ epoch: 1, position: 3 });
  });

  it('refuses a cursor saved for other data, and bad options', () => {
    const cursor = new DataLoader(EXAMPLES, base).cursor;
    const changed = EXAMPLES.map((e, i) => (i === 5 ? example(5, e.inputIds.length, 1) : e));
    expect(() => new DataLoader(changed, { ...base, cursor })).toThrow(DataError);
    expect(() => new DataLoader(changed, { ...base, cursor })).toThrow(/was saved for other data/);
    expect(() => new DataLoader(EXAMPLES.slice(1), { ...base, cursor })).toThrow(/10 examples/);
    expect(() => new DataLoader(EXAMPLES, { ...base, cursor: { ...cursor, position: 12 } })).toThrow(/past the 11/);
    expect(() => new DataLoader([], base)).toThrow(/no examples/);
    expect(() => new DataLoader(EXAMPLES, { ...base, seq: 5 })).toThrow(/more than the sequence length/);
    expect(() => new DataLoader(EXAMPLES, { ...base, batch: 0 })).toThrow(RangeError);
    expect(() => new DataLoader(EXAMPLES, { ...base, seed: -1 })).toThrow(RangeError);
  });

  it('fingerprints differ when ids or labels differ', () => {
    const f = fingerprintExamples(EXAMPLES);
    expect(f).toMatch(/^[0-9a-f]{8}$/);
    const labels = EXAMPLES.map((e, i) => (i === 0 ? { ...e, labels: e.labels.map(() => IGNORE_INDEX) } : e));
    expect(fingerprintExamples(labels)).not.toBe(f);
    expect(fingerprintExamples(EXAMPLES.slice(0, 10))).not.toBe(f);
    expect(fingerprintExamples([...EXAMPLES])).toBe(f);
  });
});

describe('splitHeldOut', () => {
  const items = Array.from({ length: 10 }, (_, i) => i);

  it('last fraction and every k-th, in file order', () => {
    expect(splitHeldOut(items, { lastFraction: 0.2 })).toEqual({ train: [0, 1, 2, 3, 4, 5, 6, 7], heldOut: [8, 9] });
    expect(splitHeldOut(items, { lastFraction: 0.01 }).heldOut).toEqual([9]); // at least one
    expect(splitHeldOut(items, { lastFraction: 0.99 }).train).toEqual([0]); // at least one left to train
    expect(splitHeldOut(items, { every: 4 })).toEqual({ train: [0, 1, 2, 4, 5, 6, 8, 9], heldOut: [3, 7] });
  });

  it('refuses splits that leave a side empty', () => {
    expect(() => splitHeldOut([1], { lastFraction: 0.5 })).toThrow(/at least 2/);
    expect(() => splitHeldOut(items, { lastFraction: 0 })).toThrow(RangeError);
    expect(() => splitHeldOut(items, { lastFraction: 1 })).toThrow(RangeError);
    expect(() => splitHeldOut(items, { every: 1 })).toThrow(RangeError);
    expect(() => splitHeldOut(items, { every: 11 })).toThrow(/holds none/);
  });
});

describe('packExamples', () => {
  it('joins fully trained examples and re-cuts them into windows', () => {
    const docs = [example(0, 5), example(1, 3), example(2, 6)];
    const packed = packExamples(docs, 4);
    const stream = docs.flatMap((d) => Array.from(d.inputIds));
    expect(packed.map((p) => Array.from(p.inputIds))).toEqual([
      stream.slice(0, 4),
      stream.slice(4, 8),
      stream.slice(8, 12),
      stream.slice(12, 14),
    ]);
    for (const p of packed) expect(p.labels).toEqual(p.inputIds);
  });

  it('refuses examples with masked positions', () => {
    expect(() => packExamples([example(0, 5), example(1, 4, 2)], 4)).toThrow(/example 1 \(prompt-completion, line 2\)/);
  });
});

describe('statistics and estimate', () => {
  it('dataStats counts tokens, trained tokens (labels[1:] not -100) and truncations', () => {
    const truncated = { ...example(20, 4), fullLength: 9 };
    const stats = dataStats([example(0, 5), example(1, 6, 3), truncated], 2);
    expect(stats).toEqual({
      examples: 3,
      tokens: 15,
      trainedTokens: 4 + 3 + 3,
      truncated: 1,
      truncatedTokens: 5,
      dropped: 2,
      maxLength: 6,
      byFormat: { text: 2, 'prompt-completion': 1 },
    });
  });

  it('estimateTraining: batches, steps, epochs, padding and trained tokens', () => {
    const stats = dataStats(EXAMPLES);
    const e = estimateTraining(stats, { batch: 4, seq: 8, epochs: 2, gradAccum: 2 });
    expect(e).toMatchObject({ batchesPerEpoch: 3, stepsPerEpoch: 2, batches: 6, steps: 3, epochs: 2 });
    expect(e.slots).toBe(6 * 4 * 8);
    expect(e.trainedTokens).toBe(2 * stats.trainedTokens);
    expect(e.paddingFraction).toBeCloseTo(1 - (2 * stats.tokens) / e.slots, 12);
    // Cross-check against an actual loader run over the same two epochs.
    const batches = [...new DataLoader(EXAMPLES, { batch: 4, seq: 8, padId: 0, epochs: 2 })];
    expect(batches).toHaveLength(e.batches);
    expect(batches.reduce((s, b) => s + b.predicted, 0)).toBe(e.trainedTokens);
    const bySteps = estimateTraining(stats, { batch: 4, seq: 8, steps: 9 });
    expect(bySteps).toMatchObject({ steps: 9, batches: 9, epochs: 3 });
    expect(() => estimateTraining(stats, { batch: 4, seq: 8, steps: 1, epochs: 1 })).toThrow(/not both/);
  });
});

describe('prepareDataset on a real tokenizer', () => {
  it('stories260K prompt_completion.jsonl at seq 16: truncations and dropped lines as the golden says', async () => {
    const tok = await loadTokenizerFromDirectory(resolve(root, 'apps/studio/public/models/stories260K'));
    const content = await readFile(resolve(here, 'fixtures/data/prompt_completion.jsonl'), 'utf8');
    const golden = JSON.parse(await readFile(resolve(here, 'golden/data/stories260K.json'), 'utf8')) as {
      cases: {
        fixture: string;
        seq: number;
        examples: { labels: number[]; full_length?: number }[];
        dropped_lines: number[];
      }[];
    };
    const c = golden.cases.find((x) => x.fixture === 'prompt_completion.jsonl' && x.seq === 16)!;
    const data = prepareDataset(tok, content, { file: 'prompt_completion.jsonl', seq: 16 });
    expect(data.format).toBe('jsonl');
    expect(data.droppedLines).toEqual(c.dropped_lines);
    expect(data.stats.dropped).toBe(c.dropped_lines.length);
    expect(data.stats.examples).toBe(c.examples.length);
    expect(data.stats.truncated).toBe(c.examples.filter((e) => e.full_length !== undefined).length);
    expect(data.stats.trainedTokens).toBe(
      c.examples.reduce((s, e) => s + e.labels.slice(1).filter((l) => l !== IGNORE_INDEX).length, 0),
    );
    // Packing is refused for prompt/completion data, with the line of the first such record.
    expect(() => prepareDataset(tok, content, { file: 'pc.jsonl', seq: 16, pack: true })).toThrow(
      /pc\.jsonl, line 1: cannot be packed/,
    );
    // {"text"} records pack into full windows of the untruncated documents.
    const text = await readFile(resolve(here, 'fixtures/data/text.jsonl'), 'utf8');
    const unpacked = prepareDataset(tok, text, { file: 'text.jsonl', seq: 1000 });
    const packed = prepareDataset(tok, text, { file: 'text.jsonl', seq: 16, pack: true });
    expect(packed.examples.slice(0, -1).every((e) => e.inputIds.length === 16)).toBe(true);
    expect(packed.examples.flatMap((e) => Array.from(e.inputIds))).toEqual(
      unpacked.examples.flatMap((e) => Array.from(e.inputIds)).slice(0, packed.stats.tokens),
    );
    expect(packed.stats.truncated).toBe(0);
    expect(() => prepareDataset(tok, '   \n', { file: 'empty.txt', seq: 16 })).toThrow(/empty\.txt: is empty/);
    expect(() => prepareDataset(tok, 'not jsonl', { file: 'bad.jsonl', seq: 16 })).toThrow(/bad\.jsonl, line 1/);
  });
});
