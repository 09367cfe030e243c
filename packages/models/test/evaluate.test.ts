// `webtune eval` semantics against transformers: the fixture text tokenized as a whole, cut into
// windows of 64 tokens (a last window of ≥ 2 kept), mean cross-entropy over every predicted
// position (tools/golden_forward.py's eval record).
import { tensorFromData } from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { NonFiniteLossError } from '../src/errors.js';
import { evaluateLoss } from '../src/evaluate.js';
import { loadModel } from '../src/model.js';
import { loadTokenizer } from '../src/tokenizer.js';
import { FIXTURES, fixturePath, forwardGolden, repoSource } from './fixtures.js';

const gpu = useGpu();

/** The CLI's windowing, written out here so the test does not depend on the train package. */
function windows(ids: number[], seq: number): number[][] {
  const out: number[][] = [];
  for (let s = 0; s < ids.length; s += seq) {
    const w = ids.slice(s, s + seq);
    if (w.length >= 2) out.push(w);
  }
  return out;
}

describe('evaluation loss against transformers', () => {
  for (const name of FIXTURES) {
    it(name, async () => {
      const ctx = gpu();
      const golden = await forwardGolden(name);
      const source = await repoSource(fixturePath(name));
      const tokenizer = await loadTokenizer(source);
      // golden.eval.text is the text file's path from the repository root.
      const slash = golden.eval.text.lastIndexOf('/');
      const textSource = await repoSource(golden.eval.text.slice(0, slash));
      const text = (await textSource.readText(golden.eval.text.slice(slash + 1))) as string;
      const ids = tokenizer.encode(text);
      expect(ids.length).toBe(golden.eval.text_tokens);
      const w = windows(ids, golden.eval.seq);
      expect(w.length).toBe(golden.eval.windows);
      const r = await gpuCase(ctx, `eval ${name}`, async () => {
        const model = await loadModel(ctx, source, { precision: 'f32' });
        const out = await evaluateLoss(
          ctx,
          model,
          w.map((inputIds) => ({ inputIds })),
          { batch: 16 },
        );
        model.dispose();
        return out;
      });
      expect(r.tokens).toBe(golden.eval.tokens);
      expect(Math.abs(r.loss - golden.eval.loss) / golden.eval.loss).toBeLessThan(1e-5);
      expect(Math.abs(r.perplexity - golden.eval.perplexity) / golden.eval.perplexity).toBeLessThan(1e-4);
    });
  }
});

describe('evaluation with weights that give non-finite logits', () => {
  it('names the examples whose loss is NaN instead of returning it', async () => {
    const ctx = gpu();
    const source = await repoSource(fixturePath('tiny-llama'));
    const err = await gpuCase(ctx, 'eval NaN adapter', async () => {
      const model = await loadModel(ctx, source, { precision: 'f32' });
      const c = model.config;
      const r = 2;
      // An adapter from a run that diverged: one NaN in q_proj's B of layer 0.
      const b = new Float32Array(c.numHeads * c.headDim * r);
      b[5] = Number.NaN;
      const a = tensorFromData(ctx, new Float32Array(r * c.hiddenSize).fill(0.01), [r, c.hiddenSize], 'f32', 'A');
      const bt = tensorFromData(ctx, b, [c.numHeads * c.headDim, r], 'f32', 'B');
      const lora = new Map([['model.layers.0.self_attn.q_proj', { a, b: bt, scale: 1 }]]);
      // Example 0 is too short to predict anything, so the first batch is example 1 alone.
      const examples = [{ inputIds: [1] }, { inputIds: [1, 2, 3, 4] }, { inputIds: [5, 6, 7, 8] }];
      const e = await evaluateLoss(ctx, model, examples, { batch: 1, lora }).catch((x: unknown) => x);
      a.dispose();
      bt.dispose();
      model.dispose();
      return e;
    });
    expect(err).toBeInstanceOf(NonFiniteLossError);
    expect((err as NonFiniteLossError).examples).toEqual([1]);
    expect((err as Error).message).toMatch(/example 1 \(4 tokens\) is NaN/);
  });
});
