// `webtune eval` semantics against transformers: the fixture text tokenized as a whole, cut into
// windows of 64 tokens (a last window of ≥ 2 kept), mean cross-entropy over every predicted
// position (tools/golden_forward.py's eval record).
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
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
