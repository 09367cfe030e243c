/**
 * Examples -> batches of B x T int32 input ids and labels, shuffled per epoch with a seed, with a
 * cursor that resumes training exactly where a checkpoint left it.
 *
 * One example per row: rows are right-padded to T with the pad id (labels IGNORE_INDEX), and
 * examples are never packed into one row by default, so with causal attention no token sees
 * another example or a pad (pads only follow the real tokens, and their labels are ignored).
 * packExamples is the opt-in exception for data trained on every token ({"text"} records, plain
 * text windows), as transformers' run_clm "group_texts" does.
 *
 * Order: epoch e visits the examples in permutation(n, seed, e) (random.ts), or in file order
 * without shuffling; B consecutive entries make a batch. The cursor (seed, epoch, position =
 * entries of epoch e already served) is plain JSON; a loader built on the same examples with that
 * cursor yields exactly the batches the first one would have yielded next. It also records the
 * number of examples and a fingerprint of their ids and labels, so resuming on different data (a
 * changed file, tokenizer or sequence length) is an error rather than a silent reshuffle.
 */

import { DataError } from './errors.js';
import { type Example, IGNORE_INDEX, windowBounds } from './examples.js';
import { permutation } from './random.js';

export interface DataCursor {
  seed: number;
  shuffle: boolean;
  /** The epoch of the next batch (0-based). */
  epoch: number;
  /** Entries of that epoch's order already served. */
  position: number;
  /** Number of examples the cursor was made for. */
  examples: number;
  /** fingerprintExamples() of those examples. */
  fingerprint: string;
}

export interface BatchOptions {
  /** Rows per batch (B). */
  batch: number;
  /** Tokens per row (T); every example must be at most this long (tokenize with the same seq). */
  seq: number;
  /** The id written into padding (padIdOf(tokenizer)); padding labels are IGNORE_INDEX. */
  padId: number;
  /** Shuffle seed (non-negative integer). Default 0. */
  seed?: number;
  /** Visit the examples in a new random order each epoch. Default true. */
  shuffle?: boolean;
  /** Stop after this many epochs. Default: never (the trainer decides when to stop). */
  epochs?: number;
  /**
   * Leave out an epoch's last batch when it would be partial. Default false: that batch is
   * completed with empty rows (all padding, no loss), so every example is seen once per epoch.
   */
  dropLast?: boolean;
  /** Resume from a saved cursor (seed and shuffle then come from the cursor). */
  cursor?: DataCursor;
}

export interface Batch {
  /** (batch, seq) row-major token ids; padding holds the pad id. */
  inputIds: Int32Array;
  /** (batch, seq) labels; IGNORE_INDEX on padding and on positions that take no loss. */
  labels: Int32Array;
  /** (batch) real tokens in each row; 0 for an empty row. */
  lengths: Int32Array;
  batch: number;
  seq: number;
  /** Rows that hold an example (the others are empty). */
  rows: number;
  /** The index into the examples of each of those rows. */
  indices: number[];
  /** Real tokens in the batch. */
  tokens: number;
  /** Positions counted by the loss (t >= 1, label not ignored): the mean's denominator. */
  predicted: number;
  /** The epoch this batch belongs to. */
  epoch: number;
  /** True for the last batch of its epoch. */
  lastOfEpoch: boolean;
  /** Where the next batch starts: save this with a checkpoint. */
  cursor: DataCursor;
}

/** The id used for padding: the tokenizer's pad token, else its EOS, else 0. */
export function padIdOf(tokenizer: { padTokenId: number | undefined; eosTokenIds: readonly number[] }): number {
  return tokenizer.padTokenId ?? tokenizer.eosTokenIds[0] ?? 0;
}

function checkCount(name: string, value: number, min: number): void {
  if (!Number.isSafeInteger(value) || value < min)
    throw new RangeError(`${name} must be an integer >= ${min}, got ${value}`);
}

/** FNV-1a (32-bit) over each example's length, ids and labels, as 8 hex digits. */
export function fingerprintExamples(examples: readonly Example[]): string {
  let h = 0x811c9dc5;
  const mix = (v: number) => {
    for (let k = 0; k < 4; k++) {
      h = Math.imul(h ^ ((v >>> (8 * k)) & 0xff), 0x01000193);
    }
  };
  mix(examples.length);
  for (const e of examples) {
    mix(e.inputIds.length);
    for (const id of e.inputIds) mix(id);
    for (const label of e.labels) mix(label);
  }
  return (h >>> 0).toString(16).padStart(8, '0');
}

/**
 * One batch from the examples at `indices` (at most `batch` of them; missing rows are empty).
 * Rows are `seq` long: the trainer's GPU plan has fixed B x T shapes, so every batch is padded to
 * seq (a batch padded only to its longest row would need a plan per length).
 */
export function makeBatch(
  examples: readonly Example[],
  indices: readonly number[],
  options: Pick<BatchOptions, 'batch' | 'seq' | 'padId'>,
): Omit<Batch, 'epoch' | 'lastOfEpoch' | 'cursor'> {
  const { batch, padId } = options;
  checkCount('batch', batch, 1);
  checkCount('seq', options.seq, 2);
  if (indices.length > batch) throw new RangeError(`${indices.length} examples do not fit a batch of ${batch}`);
  for (const i of indices) {
    const example = examples[i];
    if (example === undefined) throw new RangeError(`example index ${i} is out of range (${examples.length} examples)`);
    const n = example.inputIds.length;
    if (n > options.seq) {
      throw new RangeError(
        `example ${i} has ${n} tokens, more than the sequence length ${options.seq} (tokenize with the same seq to truncate)`,
      );
    }
  }
  const seq = options.seq;
  const inputIds = new Int32Array(batch * seq).fill(padId); // (batch, seq)
  const labels = new Int32Array(batch * seq).fill(IGNORE_INDEX); // (batch, seq)
  const lengths = new Int32Array(batch); // (batch)
  let tokens = 0;
  let predicted = 0;
  indices.forEach((index, row) => {
    const example = examples[index]!;
    inputIds.set(example.inputIds, row * seq);
    labels.set(example.labels, row * seq);
    lengths[row] = example.inputIds.length;
    tokens += example.inputIds.length;
    for (let t = 1; t < example.labels.length; t++) if (example.labels[t] !== IGNORE_INDEX) predicted++;
  });
  return { inputIds, labels, lengths, batch, seq, rows: indices.length, indices: [...indices], tokens, predicted };
}

/** Batches over epochs in a seeded order (module header). Iterable; next() returns undefined after the last epoch. */
export class DataLoader implements Iterable<Batch> {
  /** Batches in one epoch. */
  readonly batchesPerEpoch: number;
  readonly fingerprint: string;
  private readonly seed: number;
  private readonly shuffle: boolean;
  private epoch: number;
  private position: number;
  private order: Uint32Array | undefined;
  private orderEpoch = -1;

  constructor(
    private readonly examples: readonly Example[],
    private readonly options: BatchOptions,
  ) {
    checkCount('batch', options.batch, 1);
    checkCount('seq', options.seq, 2);
    if (options.epochs !== undefined) checkCount('epochs', options.epochs, 1);
    const n = examples.length;
    if (n === 0) throw new RangeError('no examples to batch');
    examples.forEach((e, i) => {
      if (e.inputIds.length > options.seq) {
        throw new RangeError(
          `example ${i} has ${e.inputIds.length} tokens, more than the sequence length ${options.seq} (tokenize with the same seq to truncate)`,
        );
      }
    });
    this.batchesPerEpoch = options.dropLast ? Math.floor(n / options.batch) : Math.ceil(n / options.batch);
    if (this.batchesPerEpoch === 0) {
      throw new RangeError(`dropLast with ${n} examples and batches of ${options.batch} leaves no batch at all`);
    }
    this.fingerprint = fingerprintExamples(examples);
    const cursor = options.cursor;
    if (cursor === undefined) {
      this.seed = options.seed ?? 0;
      this.shuffle = options.shuffle ?? true;
      checkCount('seed', this.seed, 0);
      this.epoch = 0;
      this.position = 0;
    } else {
      const where = 'the data cursor';
      if (cursor.examples !== n || cursor.fingerprint !== this.fingerprint) {
        throw new DataError(
          where,
          undefined,
          `was saved for other data (${cursor.examples} examples, fingerprint ${cursor.fingerprint}; these are ${n} examples, fingerprint ${this.fingerprint}): the file, the tokenizer or the sequence length changed`,
        );
      }
      checkCount('cursor.seed', cursor.seed, 0);
      checkCount('cursor.epoch', cursor.epoch, 0);
      checkCount('cursor.position', cursor.position, 0);
      if (cursor.position > n)
        throw new DataError(where, undefined, `position ${cursor.position} is past the ${n} examples`);
      this.seed = cursor.seed;
      this.shuffle = cursor.shuffle;
      this.epoch = cursor.epoch;
      this.position = cursor.position;
    }
    this.settle();
  }

  /** Where the next batch starts (plain JSON). */
  get cursor(): DataCursor {
    return {
      seed: this.seed,
      shuffle: this.shuffle,
      epoch: this.epoch,
      position: this.position,
      examples: this.examples.length,
      fingerprint: this.fingerprint,
    };
  }

  /** Entries of an epoch's order that are served (all of them, or whole batches with dropLast). */
  private get servedPerEpoch(): number {
    return this.options.dropLast ? this.batchesPerEpoch * this.options.batch : this.examples.length;
  }

  /** Moves a position at the end of an epoch to the start of the next. */
  private settle(): void {
    if (this.position >= this.servedPerEpoch) {
      this.epoch++;
      this.position = 0;
    }
  }

  /** The order of an epoch: a seeded permutation, or file order. */
  private orderOf(epoch: number): ArrayLike<number> | undefined {
    if (!this.shuffle) return undefined;
    if (this.orderEpoch !== epoch) {
      this.order = permutation(this.examples.length, this.seed, epoch);
      this.orderEpoch = epoch;
    }
    return this.order;
  }

  next(): Batch | undefined {
    if (this.options.epochs !== undefined && this.epoch >= this.options.epochs) return undefined;
    const epoch = this.epoch;
    const order = this.orderOf(epoch);
    const end = Math.min(this.position + this.options.batch, this.servedPerEpoch);
    const indices: number[] = [];
    for (let k = this.position; k < end; k++) indices.push(order === undefined ? k : order[k]!);
    this.position = end;
    this.settle();
    const lastOfEpoch = this.epoch !== epoch;
    return { ...makeBatch(this.examples, indices, this.options), epoch, lastOfEpoch, cursor: this.cursor };
  }

  *[Symbol.iterator](): Iterator<Batch> {
    for (let batch = this.next(); batch !== undefined; batch = this.next()) yield batch;
  }
}

// ---------------------------------------------------------------------------------------------
// Held-out split and packing

/**
 * Which examples are held out for evaluation, by position in file order (decided before any
 * shuffling, so it does not depend on the seed):
 * - { lastFraction: f }: the last round(f * n) examples (at least 1, at most n - 1);
 * - { every: k }: every k-th example (indices k-1, 2k-1, ...), k >= 2.
 */
export type HeldOutSplit = { lastFraction: number } | { every: number };

export function splitHeldOut<T>(examples: readonly T[], split: HeldOutSplit): { train: T[]; heldOut: T[] } {
  const n = examples.length;
  if (n < 2) throw new RangeError(`holding examples out needs at least 2 examples, got ${n}`);
  if ('lastFraction' in split) {
    const f = split.lastFraction;
    if (!(f > 0 && f < 1)) throw new RangeError(`lastFraction must be in (0, 1), got ${f}`);
    const count = Math.min(n - 1, Math.max(1, Math.round(f * n)));
    return { train: examples.slice(0, n - count), heldOut: examples.slice(n - count) };
  }
  const k = split.every;
  checkCount('every', k, 2);
  if (n < k) throw new RangeError(`every ${k}th example holds none out of ${n}`);
  const train: T[] = [];
  const heldOut: T[] = [];
  examples.forEach((e, i) => {
    (i % k === k - 1 ? heldOut : train).push(e);
  });
  return { train, heldOut };
}

/**
 * Joins examples end to end and cuts the stream into windows of seq tokens (a last window of >= 2
 * kept), as transformers' run_clm group_texts does: every row is full, but attention then crosses
 * from one example into the next (each {"text"} record ends with EOS, which marks the boundary).
 * Only examples trained on every token can be packed: packing a prompt or a conversation would let
 * it attend to the previous example's answer, so those are refused.
 */
export function packExamples(examples: readonly Example[], seq: number): Example[] {
  let total = 0;
  examples.forEach((e, i) => {
    for (let t = 0; t < e.labels.length; t++) {
      if (e.labels[t] !== e.inputIds[t]) {
        throw new RangeError(
          `example ${i} (${e.format}${e.line === undefined ? '' : `, line ${e.line}`}) has positions without loss; only examples trained on every token ({"text"} records, plain text) can be packed`,
        );
      }
    }
    total += e.inputIds.length;
  });
  const stream = new Int32Array(total);
  let offset = 0;
  for (const e of examples) {
    stream.set(e.inputIds, offset);
    offset += e.inputIds.length;
  }
  return windowBounds(total, seq).map(([start, end], window) => {
    const inputIds = stream.slice(start, end);
    return { inputIds, labels: inputIds.slice(), format: 'text-window', window };
  });
}
