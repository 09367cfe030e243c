// The trainer with f16 forward tiles (TrainerOptions.tileMath 'f16': trainingTileMath's default on
// GPUs with shader-f16) against the same trainer with f32 tiles, over 50 AdamW steps on the same
// data: a Llama with every linear adapted on a Q8_0 base, GPU kernels (q, k and v in one f16
// dispatch with three LoRA terms, LoRA's h in the other projections' f16 dispatches, the attention
// in f16 and its backward reading q, k and v rounded alike). f16 rounds the forward's activations
// and staged weights, so the losses are not the same to f32's bounds as
// the fused and plain plans are (fused.node.test.ts), but must stay within f16's: within 1e-2
// relative at every step (measured 4.5e-4) and the adapters within 2e-2 of each other after 50
// steps (measured 6.4e-3: AdamW moves a parameter whose gradient is near zero by up to lr a step,
// whatever its sign). Same plan otherwise: the same dispatches per step, as estimateMemory counts.
// Runs where the adapter has shader-f16 (the node-lavapipe-f16 project) and skips elsewhere.
import { diffCounters, trainingTileMath } from '@webtune/core';
import { loadModel } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { repoSource } from '../../models/test/fixtures.js';
import { estimateMemory } from '../src/memory.js';
import { LoraTrainer, type TrainerOptions } from '../src/trainer.js';

const gpu = useGpu({ kernelProfile: 'gpu' });
const STEPS = 50;

describe(`f16 forward tiles against f32 tiles over ${STEPS} training steps`, () => {
  it('tiny-llama-q at q8_0, all-linear, GPU kernels', async (t) => {
    const ctx = gpu();
    if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
    const source = await repoSource('packages/models/test/fixtures/tiny-llama-q');
    await gpuCase(ctx, 'f16 against f32 tiles', async () => {
      const model = await loadModel(ctx, source, { precision: 'q8_0' });
      const options: TrainerOptions = {
        batch: 2,
        seq: 12,
        optimizer: { lr: 2e-3 },
        seed: 3,
        lora: { r: 4, lora_alpha: 8, target_modules: 'all-linear' },
      };
      // Left unset, the tile math is trainingTileMath's: f16 here (shader-f16, GPU kernels).
      const f16 = await LoraTrainer.create(ctx, model, options);
      const f32 = await LoraTrainer.create(ctx, model, { ...options, tileMath: 'f32' });
      expect(trainingTileMath(ctx)).toBe('f16');
      expect(f16.tileMath).toBe('f16');
      expect(f32.tileMath).toBe('f32');
      const rows = options.batch * options.seq;
      const V = model.config.vocabSize;
      const micro = (s: number) => {
        const ids = Array.from({ length: rows }, (_, i) => 1 + ((s * 31 + i * 7 + ((i * i) % 5)) % (V - 1)));
        return [{ inputIds: ids, labels: ids }];
      };
      const perStep = { f16: 0, f32: 0 };
      let worst = 0;
      for (let s = 0; s < STEPS; s++) {
        const c0 = ctx.counters;
        const a = await f16.trainStep(micro(s));
        const c1 = ctx.counters;
        const b = await f32.trainStep(micro(s));
        perStep.f16 = diffCounters(c0, c1).dispatches;
        perStep.f32 = diffCounters(c1, ctx.counters).dispatches;
        const rel = Math.abs(a.loss - b.loss) / Math.abs(b.loss);
        worst = Math.max(worst, rel);
        expect(rel, `step ${s}: f16 tiles' loss ${a.loss}, f32 tiles' ${b.loss}`).toBeLessThanOrEqual(1e-2);
      }
      const wa = await f16.readWeights();
      const wb = await f32.readWeights();
      let worstWeight = 0;
      for (const [module, w] of wb) {
        for (const key of ['a', 'b'] as const) {
          const x = wa.get(module)?.[key] as Float32Array;
          const y = w[key];
          let err = 0;
          for (let i = 0; i < y.length; i++) err = Math.max(err, Math.abs((x[i] as number) - (y[i] as number)));
          worstWeight = Math.max(worstWeight, err);
          expect(err, `${module} lora_${key.toUpperCase()}`).toBeLessThanOrEqual(2e-2);
        }
      }
      const estimate = estimateMemory(model.config, options.lora, {
        batch: options.batch,
        seq: options.seq,
        precision: 'q8_0',
        device: ctx,
      }).settings.dispatchesPerStep;
      expect(perStep.f16).toBe(estimate);
      expect(perStep.f32).toBe(estimate);
      console.log(
        `f16 against f32 tiles: ${STEPS} steps, worst loss difference ${worst.toExponential(2)} relative, worst adapter difference ${worstWeight.toExponential(2)}; ${perStep.f16} dispatches per step`,
      );
      f16.dispose();
      f32.dispose();
      model.dispose();
    });
  }, 300_000);
});
