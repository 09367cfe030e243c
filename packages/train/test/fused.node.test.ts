// The fused training plan (kernels that do two steps of the plain plan in one dispatch) against
// the plain plan, over 50 AdamW steps on the same data: the same loss at every step (within 1e-4
// relative; the fusions keep every operation, a few reduce in another order, so the losses differ
// by a few 1e-7), the same adapter at the end, and each plan's dispatches per step as estimateMemory
// predicts them, the fused one fewer. Under Node only (Dawn on SwiftShader, the same kernels the
// browsers compile): 400 training steps would take minutes on Chromium's lavapipe.

import { fileURLToPath } from 'node:url';
import { diffCounters } from '@webtune/core';
import { directorySource, loadModel, type ModelSource, type WeightPrecision } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { estimateMemory } from '../src/memory.js';
import { LoraTrainer, type TrainerOptions } from '../src/trainer.js';

const gpu = useGpu();
// The GPU kernel configurations on the same adapter: the fusions planned only where they pay on
// GPUs (the norm inside the gated MLP's dispatch, LoRA's h inside its projection's matmul, q, k
// and v in one dispatch, RoPE in the q and k projections' store, g and dB of two projections in
// one).
const gpuKernels = useGpu({ kernelProfile: 'gpu' });

function fixture(name: string): ModelSource {
  return directorySource(fileURLToPath(new URL(`../../models/test/fixtures/${name}`, import.meta.url)));
}

interface Case {
  fixture: string;
  precision: WeightPrecision;
  options: Omit<TrainerOptions, 'fuse'>;
  /** Plan with the GPU kernel configurations (kernelProfile 'gpu'). */
  gpuKernels?: boolean;
}

const STEPS = 50;
const base = { batch: 2, seq: 12, optimizer: { lr: 2e-3 }, seed: 3 };
const CASES: Case[] = [
  // Llama-shaped with grouped-query attention: RoPE of q and k; GPU kernels, so q, k and v are one
  // dispatch (q's and v's LoRA terms, their h from the norm before).
  { fixture: 'tiny-llama', precision: 'f32', options: { ...base, lora: { r: 4, lora_alpha: 8 } }, gpuKernels: true },
  // A lone q (LoRA's h in its matmul, stored through the RoPE epilogue, while k and v share a
  // dispatch) and a gate adapted without its up (h in its matmul; up stores the nonlinearity).
  {
    fixture: 'tiny-llama3',
    precision: 'f16',
    options: { ...base, lora: { r: 4, lora_alpha: 8, target_modules: ['q_proj', 'gate_proj'] } },
    gpuKernels: true,
  },
  // Every linear of a Llama adapted on a Q8_0 base, GPU kernels: q, k and v in one dispatch with
  // three LoRA terms, their h from one dispatch before it.
  {
    fixture: 'tiny-llama-q',
    precision: 'q8_0',
    options: { ...base, lora: { r: 4, lora_alpha: 8, target_modules: 'all-linear' } },
    gpuKernels: true,
  },
  // Qwen3's per-head q/k norms before RoPE, every linear adapted, LoRA dropout, accumulation.
  {
    fixture: 'tiny-qwen3',
    precision: 'f16',
    options: {
      ...base,
      gradAccum: 2,
      lora: { r: 8, lora_alpha: 16, target_modules: 'all-linear', lora_dropout: 0.1 },
    },
  },
  // GPT-2: gelu in the fc projection's epilogue and its backward in c_proj's dx; GPU kernels, so
  // c_attn and both c_proj form LoRA's h inside their matmul.
  {
    fixture: 'tiny-gpt2',
    precision: 'f32',
    options: { ...base, lora: { r: 4, lora_alpha: 8, target_modules: 'all-linear' } },
    gpuKernels: true,
  },
  // A quantized base with recomputation (the replayed forward is fused too); GPU kernels, so q, k
  // and v each form LoRA's h inside their matmul (q and k through the RoPE epilogue).
  {
    fixture: 'tiny-qwen2-q',
    precision: 'q4_0',
    options: {
      ...base,
      recompute: true,
      lora: { r: 4, lora_alpha: 8, target_modules: ['q_proj', 'k_proj', 'v_proj'] },
    },
    gpuKernels: true,
  },
];

describe(`fused plan against the plain plan over ${STEPS} steps`, () => {
  for (const c of CASES) {
    const name = `${c.fixture} ${c.precision} ${JSON.stringify(c.options.lora)}${c.options.recompute ? ' recompute' : ''}${c.gpuKernels ? ' GPU kernels' : ''}`;
    it(name, async () => {
      const ctx = c.gpuKernels ? gpuKernels() : gpu();
      const source = await fixture(c.fixture);
      await gpuCase(ctx, name, async () => {
        const model = await loadModel(ctx, source, { precision: c.precision });
        const fused = await LoraTrainer.create(ctx, model, { ...c.options, fuse: true });
        const plain = await LoraTrainer.create(ctx, model, { ...c.options, fuse: false });
        const rows = c.options.batch * c.options.seq;
        const V = model.config.vocabSize;
        const micro = (s: number) =>
          Array.from({ length: c.options.gradAccum ?? 1 }, (_, k) => {
            const ids = Array.from(
              { length: rows },
              (_, i) => 1 + ((s * 31 + k * 17 + i * 7 + ((i * i) % 5)) % (V - 1)),
            );
            return { inputIds: ids, labels: ids };
          });
        const perStep = { fused: 0, plain: 0 };
        let worst = 0;
        for (let s = 0; s < STEPS; s++) {
          const c0 = ctx.counters;
          const a = await fused.trainStep(micro(s));
          const c1 = ctx.counters;
          const b = await plain.trainStep(micro(s));
          perStep.fused = diffCounters(c0, c1).dispatches;
          perStep.plain = diffCounters(c1, ctx.counters).dispatches;
          const rel = Math.abs(a.loss - b.loss) / Math.abs(b.loss);
          worst = Math.max(worst, rel);
          expect(rel, `step ${s}: fused loss ${a.loss}, plain ${b.loss}`).toBeLessThanOrEqual(1e-4);
          expect(a.gradNorm).toBeCloseTo(b.gradNorm, 4);
        }
        const wa = await fused.readWeights();
        const wb = await plain.readWeights();
        for (const [module, w] of wb) {
          const got = wa.get(module);
          expect(got, module).toBeDefined();
          for (const key of ['a', 'b'] as const) {
            const x = got?.[key] as Float32Array;
            const y = w[key];
            let err = 0;
            for (let i = 0; i < y.length; i++) err = Math.max(err, Math.abs((x[i] as number) - (y[i] as number)));
            expect(err, `${module} lora_${key.toUpperCase()}`).toBeLessThanOrEqual(1e-4);
          }
        }
        const estimate = (fuse: boolean) =>
          estimateMemory(model.config, c.options.lora, {
            batch: c.options.batch,
            seq: c.options.seq,
            gradAccum: c.options.gradAccum,
            recompute: c.options.recompute,
            precision: c.precision,
            device: ctx,
            fuse,
          }).settings.dispatchesPerStep;
        expect(perStep.fused).toBe(estimate(true));
        expect(perStep.plain).toBe(estimate(false));
        expect(perStep.fused).toBeLessThan(perStep.plain);
        console.log(
          `${name}: ${STEPS} steps, worst loss difference ${worst.toExponential(2)} relative; dispatches per step fused ${perStep.fused}, plain ${perStep.plain}`,
        );
        fused.dispose();
        plain.dispose();
        model.dispose();
      });
      // Two trainers over 50 steps each take about a minute on SwiftShader alone, and up to twice
      // that beside CI's other files.
    }, 300_000);
  }
});
