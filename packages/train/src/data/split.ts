/**
 * What a file's reader collected -> the dataset: records held out for validation, each side
 * packed on request, counted and fingerprinted.
 *
 * - The split is by record (a conversation split into several examples stays on one side): the
 *   records are put in a seeded random order (Rng stream "data/validation", independent of the
 *   data order's per-epoch streams) and the first round(validation x n) are held out, at least
 *   one and at least one left to train on.
 * - pack joins the examples of each side end to end into full windows (packExamples); only for
 *   data trained on every token. Plain text is windowed already, so it changes nothing there.
 */
import { Rng } from '../random.js';
import { fingerprintExamples, packExamples } from './batches.js';
import { DataError } from './errors.js';
import type { Example } from './examples.js';
import type { Collected, DatasetFormat } from './reader.js';
import { type DataStats, dataStats } from './stats.js';

export interface TokenizedStats extends DataStats {
  /** Records read (lines, rows, elements, or windows of plain text); bad lines not included. */
  readonly records: number;
  readonly badLines: number;
  /** Examples held out for validation, and their tokens. */
  readonly validation: number;
  readonly validationTokens: number;
}

export interface TokenizedDataset {
  readonly file: string;
  /** The format as read (a .json file holding JSON Lines: 'jsonl'). */
  readonly format: DatasetFormat;
  readonly seq: number;
  readonly train: Example[];
  readonly validation: Example[];
  /** Of the training examples (examples, tokens ...), plus the counts of the whole file. */
  readonly stats: TokenizedStats;
  /** The first BAD_LINES_KEPT bad lines skipped, with why. */
  readonly badLines: readonly { readonly line: number; readonly reason: string }[];
  /** Records dropped for having no trained token left within seq. */
  readonly droppedLines: readonly number[];
  /** fingerprintExamples() of the training then the validation examples. */
  readonly fingerprint: string;
}

/** Throws unless `fraction` is a validation fraction, in [0, 1). */
export function checkValidation(fraction: number): void {
  if (!(fraction >= 0 && fraction < 1))
    throw new RangeError(`validation must be a fraction in [0, 1), got ${fraction}`);
}

/** The records held out: the first round(fraction x n) of a seeded permutation (module header). */
export function validationRecords(records: number, fraction: number, seed: number, file: string): Set<number> {
  checkValidation(fraction);
  const held = new Set<number>();
  if (fraction === 0) return held;
  if (records < 2) throw new DataError(file, undefined, 'holding out a validation split needs at least 2 records');
  const count = Math.min(records - 1, Math.max(1, Math.round(fraction * records)));
  const order = new Uint32Array(records);
  for (let i = 0; i < records; i++) order[i] = i;
  const rng = new Rng(seed, 'data/validation');
  // Only the first `count` places of a Fisher-Yates shuffle are needed.
  for (let i = 0; i < count; i++) {
    const j = i + rng.below(records - i);
    const chosen = order[j] as number;
    order[j] = order[i] as number;
    order[i] = chosen;
    held.add(chosen);
  }
  return held;
}

/** Packs one side's examples, refusing examples with positions that take no loss. */
function packSide(examples: Example[], seq: number, file: string): Example[] {
  if (examples.length === 0) return examples;
  const masked = examples.find((e) => e.labels.some((label, t) => label !== e.inputIds[t]));
  if (masked !== undefined) {
    throw new DataError(
      file,
      masked.line,
      `cannot be packed: a ${masked.format} record has tokens without loss, and packed examples attend to the previous one; only {"text"} records can be packed`,
    );
  }
  return packExamples(examples, seq);
}

/** Splits, packs and counts what the builder collected. */
export function assemble(
  collected: Collected,
  options: { file: string; seq: number; validation: number; seed: number; pack?: boolean | undefined },
): TokenizedDataset {
  const { file, seq } = options;
  const held = validationRecords(collected.records, options.validation, options.seed, file);
  let train: Example[] = [];
  let validation: Example[] = [];
  for (const { example, record } of collected.examples) (held.has(record) ? validation : train).push(example);
  if (train.length === 0)
    throw new DataError(file, undefined, 'the validation split left no example to train on; lower validation');
  if (options.pack && collected.format !== 'text') {
    train = packSide(train, seq, file);
    validation = packSide(validation, seq, file);
  }
  const dropped = collected.droppedLines.length + collected.droppedWindows;
  return {
    file,
    format: collected.format,
    seq,
    train,
    validation,
    stats: {
      ...dataStats(train, dropped),
      records: collected.records,
      badLines: collected.badCount,
      validation: validation.length,
      validationTokens: validation.reduce((n, e) => n + e.inputIds.length, 0),
    },
    badLines: collected.badLines,
    droppedLines: collected.droppedLines,
    fingerprint: fingerprintExamples([...train, ...validation]),
  };
}
