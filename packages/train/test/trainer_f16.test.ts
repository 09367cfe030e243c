// The trainer with f16 tile math (TrainerOptions.tileMath 'f16': the default on GPUs with
// shader-f16) against the same trainer with f32 tiles, over 50 AdamW steps on the same data: a
// Llama with every linear adapted on a Q8_0 base, GPU kernels (q, k and v in one f16 dispatch with
// three LoRA terms, LoRA's h in the other projections' f16 dispatches, the attention in f16 and its
// backward reading q, k and v rounded alike, and the backward's dx products and the loss's dH in
// f16 under dynamic loss scaling). f16 rounds the forward's activations, the scaled gradients and
// the staged weights, so the losses are not the same to f32's bounds as the fused and plain plans
// are (fused.node.test.ts), but must stay within f16's: within 1e-2 relative at every step
// (measured 3.8e-4; 4.5e-4 with the backward in f32) and the adapters within 2e-2 of each other
// after 50 steps (measured 6.3e-3: AdamW moves a parameter whose gradient is near zero by up to lr
// a step, whatever its sign). Same plan otherwise: the same dispatches per step but the scale's
// update, as estimateMemory counts.
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
      const estimate = (tileMath?: 'f32') =>
        estimateMemory(model.config, options.lora, {
          batch: options.batch,
          seq: options.seq,
          precision: 'q8_0',
          device: ctx,
          tileMath,
        }).settings.dispatchesPerStep;
      // The f16 run's one more: the loss scale's update.
      expect(perStep.f16).toBe(estimate());
      expect(perStep.f32).toBe(estimate('f32'));
      expect(perStep.f16).toBe(perStep.f32 + 1);
      console.log(
        `f16 against f32 tiles: ${STEPS} steps, worst loss difference ${worst.toExponential(2)} relative, worst adapter difference ${worstWeight.toExponential(2)}; ${perStep.f16} dispatches per step`,
      );
      f16.dispose();
      f32.dispose();
      model.dispose();
    });
  });
});

// Dynamic loss scaling over real steps: started at 2^24, the scaled gradients overflow f16 (the
// loss's dz alone is S/24 here), so the first steps are skipped, the adapter left exactly as it
// was, and the scale halves until they fit; after `growthInterval` good steps it doubles. Every step
// reports the scale it used, and the sequence follows GradScaler's rule from the overflow flags.
// A checkpoint taken mid-run carries the scale, and a new trainer restored from it continues the run
// step for step.
describe('dynamic loss scaling in the f16 backward', () => {
  it('skips overflowed steps without changing the adapter, halves and grows the scale, and resumes it', async (t) => {
    const ctx = gpu();
    if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
    const source = await repoSource('packages/models/test/fixtures/tiny-llama-q');
    await gpuCase(ctx, 'loss scaling', async () => {
      const model = await loadModel(ctx, source, { precision: 'q8_0' });
      const options: TrainerOptions = {
        batch: 2,
        seq: 12,
        optimizer: { lr: 2e-3 },
        seed: 5,
        lora: { r: 4, lora_alpha: 8, target_modules: 'all-linear' },
        lossScale: { initScale: 2 ** 24, growthInterval: 3 },
      };
      const trainer = await LoraTrainer.create(ctx, model, options);
      const V = model.config.vocabSize;
      const micro = (s: number) => {
        const ids = Array.from({ length: 24 }, (_, i) => 1 + ((s * 17 + i * 5 + ((i * i) % 7)) % (V - 1)));
        return [{ inputIds: ids, labels: ids }];
      };
      const bits = (w: Map<string, { a: Float32Array; b: Float32Array }>) =>
        [...w.values()].flatMap((x) => [...new Uint32Array(x.a.buffer), ...new Uint32Array(x.b.buffer)]);
      let scale = 2 ** 24;
      let good = 0;
      const seen: string[] = [];
      let resumeAt: Awaited<ReturnType<typeof trainer.readState>> | undefined;
      const after: number[] = [];
      for (let s = 0; s < 14; s++) {
        const before = bits(await trainer.readWeights());
        const r = await trainer.trainStep(micro(s));
        seen.push(`${r.step}:${r.lossScale}${r.overflow ? '!' : ''}`);
        expect(r.lossScale, `step ${r.step}: the scale it used`).toBe(scale);
        expect(Number.isFinite(r.loss)).toBe(true);
        if (r.overflow) {
          expect(bits(await trainer.readWeights()), `step ${r.step} skipped`).toEqual(before);
          scale /= 2;
          good = 0;
        } else {
          expect(Number.isFinite(r.gradNorm)).toBe(true);
          good++;
          if (good === 3) {
            scale *= 2;
            good = 0;
          }
        }
        if (s === 9) resumeAt = await trainer.readState();
        if (s > 9) after.push(r.loss);
      }
      console.log(`loss scale by step (! = overflow): ${seen.join(' ')}`);
      // Overflows at the start, and at least one growth after them.
      expect(seen[0]).toMatch(/!$/);
      expect(seen.filter((x) => !x.endsWith('!')).length).toBeGreaterThanOrEqual(3);
      const state = resumeAt as NonNullable<typeof resumeAt>;
      expect(state.lossScale).toBeDefined();
      // A new trainer restored from the state at step 10 takes steps 11..14 as the first one did.
      const resumed = await LoraTrainer.create(ctx, model, options);
      resumed.restoreState(state);
      for (let s = 10; s < 14; s++) {
        const r = await resumed.trainStep(micro(s));
        expect(r.loss, `step ${r.step} after the restore`).toBe(after[s - 10]);
      }
      expect(bits(await resumed.readWeights())).toEqual(bits(await trainer.readWeights()));
      expect(() => resumed.restoreState({ ...state, lossScale: { scale: 3, goodSteps: 0 } })).toThrow(/power of two/);
      resumed.dispose();
      trainer.dispose();
      model.dispose();
    });
  });
});
