/**
 * The mean cross-entropy of a model over tokenized examples, with transformers' semantics:
 * labels = input_ids (with -100 where no loss is taken), shifted inside, mean over every counted
 * position of every example. Examples of the same length run as one batch; the loss is computed
 * in vocabulary chunks on the GPU and only (sum, count) comes back per batch.
 */
import {
  CROSS_ENTROPY_IGNORE_INDEX,
  createTensor,
  type GpuContext,
  planCrossEntropyForward,
  readFloat32,
  readTensor,
  StepEncoder,
  type Tensor,
  WebtuneError,
  writeTensor,
} from '@webtune/core';
import { NonFiniteLossError } from './errors.js';
import { type LoraWeightsByModule, planForward } from './forward.js';
import type { CausalLM } from './model.js';

export interface TokenizedExample {
  readonly inputIds: ArrayLike<number>;
  /** Same length; -100 where no loss is taken. Default: the input ids. */
  readonly labels?: ArrayLike<number>;
}

export interface EvaluateOptions {
  /** Examples per forward pass (default 8). */
  readonly batch?: number;
  readonly lora?: LoraWeightsByModule;
  /** Called after each batch with the positions evaluated so far and in total. */
  readonly onProgress?: (done: number, total: number) => void;
  readonly signal?: AbortSignal;
}

export interface EvaluateResult {
  /** Mean cross-entropy over the counted positions (nats). */
  readonly loss: number;
  /** The number of predicted (counted) positions. */
  readonly tokens: number;
  readonly perplexity: number;
}

/** labels[t] is predicted at t - 1: the shifted target of row t is labels[t + 1], -100 last. */
export function shiftedTargets(ex: TokenizedExample): Int32Array {
  const labels = ex.labels ?? ex.inputIds;
  const T = ex.inputIds.length;
  const out = new Int32Array(T);
  for (let t = 0; t < T; t++) out[t] = t + 1 < T ? (labels[t + 1] as number) : CROSS_ENTROPY_IGNORE_INDEX;
  return out;
}

export async function evaluateLoss(
  ctx: GpuContext,
  model: CausalLM,
  examples: readonly TokenizedExample[],
  opts: EvaluateOptions = {},
): Promise<EvaluateResult> {
  const batch = opts.batch ?? 8;
  const V = model.config.vocabSize;
  // Each example with its index among `examples`, so an error can name it.
  const byLength = new Map<number, { ex: TokenizedExample; index: number }[]>();
  let total = 0;
  for (const [index, ex] of examples.entries()) {
    const T = ex.inputIds.length;
    if (T < 2) continue;
    for (let t = 0; t < T; t++) {
      const id = ex.inputIds[t] as number;
      if (!Number.isSafeInteger(id) || id < 0 || id >= V)
        throw new WebtuneError(`evaluate: token id ${id} is outside the vocabulary (${V})`);
    }
    const list = byLength.get(T) ?? [];
    list.push({ ex, index });
    byLength.set(T, list);
    total += shiftedTargets(ex).reduce((n, l) => n + (l === CROSS_ENTROPY_IGNORE_INDEX ? 0 : 1), 0);
  }
  let sum = 0;
  let count = 0;
  for (const [T, group] of byLength) {
    for (let start = 0; start < group.length; start += batch) {
      if (opts.signal?.aborted) throw new WebtuneError('evaluation was cancelled');
      const chunk = group.slice(start, start + batch);
      const r = await runBatch(
        ctx,
        model,
        chunk.map((c) => c.ex),
        T,
        opts.lora,
      );
      if (!Number.isFinite(r.sum))
        throw new NonFiniteLossError(
          chunk.map((c) => c.index),
          T,
          r.sum,
        );
      sum += r.sum;
      count += r.count;
      opts.onProgress?.(count, total);
    }
  }
  if (count === 0)
    throw new WebtuneError('evaluate: no position to predict (every example is shorter than 2 tokens or fully masked)');
  const loss = sum / count;
  return { loss, tokens: count, perplexity: Math.exp(loss) };
}

async function runBatch(
  ctx: GpuContext,
  model: CausalLM,
  examples: readonly TokenizedExample[],
  T: number,
  lora: LoraWeightsByModule | undefined,
): Promise<{ sum: number; count: number }> {
  const B = examples.length;
  const plan = await planForward(ctx, model, { B, T, lora, label: 'eval' });
  const owned: Tensor[] = [];
  const t = (shape: number[], dtype: 'f32' | 'i32' | 'u32', label: string) => {
    const x = createTensor(ctx, shape, dtype, label);
    owned.push(x);
    return x;
  };
  const labels = t([B * T], 'i32', 'eval.targets');
  const lse = t([B * T], 'f32', 'eval.lse');
  const loss = t([2], 'f32', 'eval.loss');
  const errors = t([2], 'u32', 'eval.loss_errors');
  // divisor 1: the kernel returns the sum, accumulated over batches here in float64.
  const ce = await planCrossEntropyForward(
    ctx,
    { h: plan.hidden, e: model.lmHead, labels, lse, loss, errors },
    { divisor: 1, label: 'eval.loss' },
  );
  try {
    const ids = new Int32Array(B * T);
    const targets = new Int32Array(B * T);
    examples.forEach((ex, b) => {
      ids.set(Array.from(ex.inputIds), b * T);
      targets.set(shiftedTargets(ex), b * T);
    });
    writeTensor(plan.ids, ids);
    writeTensor(labels, targets);
    const enc = new StepEncoder(ctx, 'eval')
      .clear(plan.embeddingErrors)
      .clear(errors)
      .dispatch(...plan.dispatches);
    ce.record(enc);
    enc.submit();
    const [s, n] = await readFloat32(loss);
    const bad = await readTensor(errors);
    if (bad[0] !== 0) throw new WebtuneError(`evaluate: ${bad[1]} labels outside the vocabulary`);
    return { sum: s as number, count: n as number };
  } finally {
    ce.dispose();
    plan.dispose();
    for (const x of owned) x.dispose();
  }
}
