/**
 * Test access to the committed model folders, the same way in Node (files on disk) and in the
 * browser (served by the test server, fetched with Range requests).
 */
import { directorySource, type ModelSource, urlSource } from '../src/source.js';

const inBrowser = typeof window !== 'undefined' && typeof document !== 'undefined';

/** A source for a folder given relative to the repository root. */
export async function repoSource(relative: string): Promise<ModelSource> {
  if (inBrowser) return urlSource(new URL(`/${relative}/`, window.location.origin).href);
  const { fileURLToPath } = await import('node:url');
  const root = fileURLToPath(new URL('../../../', import.meta.url));
  return directorySource(`${root}${relative}`);
}

export const FIXTURES = ['tiny-llama', 'tiny-llama3', 'tiny-qwen2', 'tiny-qwen3', 'tiny-gpt2', 'stories260K'] as const;
export type FixtureName = (typeof FIXTURES)[number];

export function fixturePath(name: FixtureName): string {
  return name === 'stories260K' ? 'apps/studio/public/models/stories260K' : `packages/models/test/fixtures/${name}`;
}

export interface ForwardGolden {
  model: string;
  path: string;
  architecture: string;
  vocab_size: number;
  num_hidden_layers: number;
  hidden_size: number;
  input_ids: number[][];
  loss: number;
  logits: { shape: number[]; data: number[] };
  /** Same forward with every matrix rounded to f16 (norms, biases and arithmetic f32). */
  logits_f16_weights: { shape: number[]; data: number[] };
  loss_f16_weights: number;
  hidden_states: { shape: number[]; data: number[] };
  last_layer_output: { shape: number[]; data: number[] };
  generate: { prompt: number[]; new_tokens: number; new_ids: number[]; min_margin: number };
  generate_bos?: { prompt: number[]; new_tokens: number; new_ids: number[]; text: string };
  eval: {
    text: string;
    seq: number;
    text_tokens: number;
    windows: number;
    tokens: number;
    loss: number;
    perplexity: number;
  };
}

const goldens = import.meta.glob<ForwardGolden>('./golden/forward/*.json', { import: 'default' });

export async function forwardGolden(name: FixtureName): Promise<ForwardGolden> {
  const load = goldens[`./golden/forward/${name}.json`];
  if (!load) throw new Error(`no forward golden for ${name}`);
  return load();
}

/** tools/golden_f16_math.py: transformers computing in f16 on forwardGolden's batch, and how far
 * that lands from its f32 reference on the same f16-rounded matrices (logits_f16_weights). */
export interface F16MathGolden {
  model: string;
  generated_by: { dtype: string };
  input_ids: number[][];
  loss_f16_math: number;
  deviation: { logits_max_abs: number; logits_rms: number; loss_abs: number };
  logits_f16_math: { shape: number[]; data: number[] };
}

const f16MathGoldens = import.meta.glob<F16MathGolden>('./golden/f16-math/*.json', { import: 'default' });

export async function f16MathGolden(name: FixtureName): Promise<F16MathGolden> {
  const load = f16MathGoldens[`./golden/f16-math/${name}.json`];
  if (!load) throw new Error(`no f16-math golden for ${name}`);
  return load();
}

/** Mean cross-entropy of next-token prediction from full logits [B, T, V], as transformers takes
 * it: row t predicts labels[t + 1] (the ids, or labels with -100 where no loss is taken). */
export function causalLmLoss(logits: ArrayLike<number>, labels: readonly (readonly number[])[], V: number): number {
  let total = 0;
  let count = 0;
  labels.forEach((row, b) => {
    const T = row.length;
    for (let t = 0; t + 1 < T; t++) {
      if (row[t + 1] === -100) continue;
      const base = (b * T + t) * V;
      let max = -Infinity;
      for (let v = 0; v < V; v++) max = Math.max(max, logits[base + v] as number);
      let sum = 0;
      for (let v = 0; v < V; v++) sum += Math.exp((logits[base + v] as number) - max);
      total += Math.log(sum) + max - (logits[base + (row[t + 1] as number)] as number);
      count++;
    }
  });
  return total / count;
}
