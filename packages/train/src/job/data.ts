/**
 * The examples webtune trained on, as the JSONL the job script reads: one line per example,
 * {"input_ids": [...], "labels": [...]}, exactly the Example's two arrays (labels = input ids with
 * -100 where no loss is taken, transformers' convention; the model shifts them itself).
 *
 * Why these columns: TRL's SFTTrainer (1.13) treats a dataset with an `input_ids` column as
 * already tokenized and skips its own tokenization and EOS handling, and uses a `labels` column as
 * it is (it builds labels from `completion_mask` / `assistant_masks` only when there is none). So
 * the cluster sees the same ids and the same loss mask, multi-turn masks included, with no
 * tokenizer or chat template involved; train.py checks after preparation that TRL left both
 * columns unchanged.
 *
 * The text is produced in chunks of about 1 MiB, so a large dataset never exists as one string.
 */
import { type Example, fingerprintExamples, IGNORE_INDEX, predictedPositions } from '../data/index.js';
import { TrainingJobError } from './errors.js';

export const JOB_TRAIN_FILE = 'data/train.jsonl';
export const JOB_VALIDATION_FILE = 'data/validation.jsonl';

export interface JobData {
  /** The training examples, in the order they were tokenized (the trainer shuffles them). */
  readonly train: readonly Example[];
  /** The held-out examples, when the run had a validation split. */
  readonly validation?: readonly Example[];
}

/** job.json's data section. */
export interface DataSummary {
  readonly train: string;
  readonly validation: string | null;
  readonly columns: readonly ['input_ids', 'labels'];
  readonly ignore_index: typeof IGNORE_INDEX;
  readonly train_examples: number;
  readonly validation_examples: number;
  /** Tokens in the training examples, and those that take loss (positions t >= 1 with a label). */
  readonly train_tokens: number;
  readonly train_trained_tokens: number;
  readonly longest_example: number;
  /** fingerprintExamples() of the training examples (what webtune's checkpoints record). */
  readonly fingerprint: string;
}

function checkExamples(split: string, examples: readonly Example[]): void {
  examples.forEach((e, i) => {
    const where = () => `data.${split}[${i}]${e.line === undefined ? '' : ` (line ${e.line})`}`;
    if (e.inputIds.length === 0) throw new TrainingJobError(where(), 'has no tokens');
    if (e.labels.length !== e.inputIds.length) {
      throw new TrainingJobError(where(), `has ${e.inputIds.length} input ids but ${e.labels.length} labels`);
    }
  });
}

/** Checks the examples and summarises them for job.json. */
export function summariseData(data: JobData): DataSummary {
  if (data.train.length === 0) throw new TrainingJobError('data.train', 'has no examples');
  checkExamples('train', data.train);
  const validation = data.validation ?? [];
  checkExamples('validation', validation);
  let tokens = 0;
  let trained = 0;
  let longest = 0;
  for (const e of data.train) {
    tokens += e.inputIds.length;
    trained += predictedPositions(e.labels);
    longest = Math.max(longest, e.inputIds.length);
  }
  for (const e of validation) longest = Math.max(longest, e.inputIds.length);
  return {
    train: JOB_TRAIN_FILE,
    validation: validation.length > 0 ? JOB_VALIDATION_FILE : null,
    columns: ['input_ids', 'labels'],
    ignore_index: IGNORE_INDEX,
    train_examples: data.train.length,
    validation_examples: validation.length,
    train_tokens: tokens,
    train_trained_tokens: trained,
    longest_example: longest,
    fingerprint: fingerprintExamples(data.train),
  };
}

/** One example's JSONL line, newline included. */
export function exampleLine(e: Pick<Example, 'inputIds' | 'labels'>): string {
  return `{"input_ids":[${e.inputIds.join(',')}],"labels":[${e.labels.join(',')}]}\n`;
}

/** The JSONL of `examples` as UTF-8 chunks of about `chunkBytes` (the text is ASCII). */
export function* jsonlChunks(examples: readonly Example[], chunkBytes = 1 << 20): Generator<Uint8Array> {
  const encoder = new TextEncoder();
  let pending: string[] = [];
  let size = 0;
  for (const e of examples) {
    const line = exampleLine(e);
    pending.push(line);
    size += line.length;
    if (size >= chunkBytes) {
      yield encoder.encode(pending.join(''));
      pending = [];
      size = 0;
    }
  }
  if (pending.length > 0) yield encoder.encode(pending.join(''));
}
