// Greedy generation with the KV cache reproduces transformers token for token: 20 tokens after a
// 5-token prompt for every fixture, and stories260K's 60-token story from BOS.
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { Generator } from '../src/generate.js';
import { loadModel } from '../src/model.js';
import { argmax, sampleToken, seededRandom } from '../src/sampling.js';
import { FIXTURES, fixturePath, forwardGolden, repoSource } from './fixtures.js';

const gpu = useGpu();

describe('greedy generation against transformers', () => {
  for (const name of FIXTURES) {
    it(name, async () => {
      const ctx = gpu();
      const golden = await forwardGolden(name);
      const source = await repoSource(fixturePath(name));
      await gpuCase(ctx, `generate ${name}`, async () => {
        const model = await loadModel(ctx, source, { precision: 'f32' });
        // f32 tiles whatever the adapter (the default on a model of f32 weights, stated): the tokens
        // must be transformers' exactly.
        const gen = await Generator.create(ctx, model, { maxSequence: 80, tileMath: 'f32' });
        const streamed: number[] = [];
        const g = golden.generate;
        const r = await gen.generate(g.prompt, {
          maxNewTokens: g.new_tokens,
          temperature: 0,
          stopTokens: [],
          onToken: (id) => streamed.push(id),
        });
        expect(r.ids).toEqual(g.new_ids);
        expect(streamed).toEqual(g.new_ids);
        expect(r.stopReason).toBe('max-new-tokens');
        if (golden.generate_bos) {
          const b = golden.generate_bos;
          const story = await gen.generate(b.prompt, { maxNewTokens: b.new_tokens, temperature: 0, stopTokens: [] });
          expect(story.ids).toEqual(b.new_ids);
        }
        gen.dispose();
        model.dispose();
      });
    });
  }

  it('stops at EOS, honours the cancel signal, and refuses an over-long prompt', async () => {
    const ctx = gpu();
    const source = await repoSource(fixturePath('stories260K'));
    await gpuCase(ctx, 'generate controls', async () => {
      const model = await loadModel(ctx, source);
      const gen = await Generator.create(ctx, model, { maxSequence: 16 });
      const controller = new AbortController();
      let seen = 0;
      await expect(
        gen.generate([1], {
          maxNewTokens: 10,
          temperature: 0,
          signal: controller.signal,
          onToken: () => {
            if (++seen === 3) controller.abort();
          },
        }),
      ).rejects.toThrow(/cancelled/);
      await expect(gen.generate(Array(16).fill(1), { maxNewTokens: 1 })).rejects.toThrow(/holds 16/);
      await expect(gen.generate([600], { maxNewTokens: 1 })).rejects.toThrow(/outside the vocabulary/);
      const full = await gen.generate([1], { maxNewTokens: 40, temperature: 0, stopTokens: [] });
      expect(full.stopReason).toBe('context-full');
      // Positions 1..15 take the first 15 new tokens; the 16th is sampled from position 15's logits
      // and needs no cache row of its own.
      expect(full.ids.length).toBe(16);
      gen.dispose();
      model.dispose();
    });
  });
});

describe('sampling', () => {
  it('is greedy at temperature 0 and reproducible for a seed', () => {
    const logits = Float32Array.from([0.1, 2, 1.9, -1, 2]);
    expect(argmax(logits)).toBe(1);
    expect(sampleToken(logits, { temperature: 0 }, seededRandom(1))).toBe(1);
    const draw = (seed: number) => {
      const r = seededRandom(seed);
      return Array.from({ length: 20 }, () => sampleToken(logits, { temperature: 1 }, r));
    };
    expect(draw(7)).toEqual(draw(7));
    expect(new Set(draw(7)).size).toBeGreaterThan(1);
  });

  it('keeps only the top k and the top-p nucleus', () => {
    const logits = Float32Array.from([5, 4, 0, -2, -3]);
    const r = seededRandom(3);
    const k1 = new Set(Array.from({ length: 50 }, () => sampleToken(logits, { topK: 1 }, r)));
    expect([...k1]).toEqual([0]);
    const k2 = new Set(Array.from({ length: 200 }, () => sampleToken(logits, { topK: 2 }, r)));
    expect([...k2].sort()).toEqual([0, 1]);
    // p(0) ≈ 0.72, p(1) ≈ 0.27: top_p 0.5 keeps token 0 only, 0.9 keeps 0 and 1.
    const p5 = new Set(Array.from({ length: 200 }, () => sampleToken(logits, { topP: 0.5 }, r)));
    expect([...p5]).toEqual([0]);
    const p9 = new Set(Array.from({ length: 400 }, () => sampleToken(logits, { topP: 0.9 }, r)));
    expect([...p9].sort()).toEqual([0, 1]);
  });
});
