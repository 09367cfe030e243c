// A training step whose forward projections take f16 tiles (ForwardOptions.tileMath 'f16', the
// trainer's default on GPUs with shader-f16: trainingTileMath) against transformers + PEFT on the
// same Q8_0-dequantized weights in f32 (tools/golden_quant_train.py; all-linear, r = 4, seeded
// non-zero A and B). The activations and the staged weights round to f16 in the forward's products
// (q, k and v in one dispatch and LoRA's h in the projections' dispatches included, forced here)
// and q, k and v in the tiled attention's, whose backward reads them rounded alike (ROUND_F16).
// Each run twice: the backward's products in f32, and in f16 under a loss scale S = 2^12 (the
// trainer's f16 backward: every dx product, its prologues and epilogues, the loss's dH and the
// tiled attention's backward stage the scaled gradients in f16; LoRA's own gradient kernels stay
// f32), whose gradients are divided by S. quantized.test.ts holds the same step with f32 tiles to f32's
// bounds; here the bounds are f16's: the loss within 5e-3 (measured 1.7e-4 to 2.3e-3) and every
// gradient within 3e-2 (max |g − g_peft| / max |g_peft|; measured 5.3e-3 to 2.0e-2 with the f32
// backward, 6.2e-3 to 2.0e-2 with the f16 one), on every architecture.
// Runs where the adapter has shader-f16 (the node-lavapipe-f16 project) and skips elsewhere.
import {
  lossScaleInitialState,
  readFloat32,
  StepEncoder,
  type Tensor,
  TensorArena,
  tensorFromData,
  writeTensor,
} from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { maxRelError } from '../../core/ref/check.js';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { type LoraTrainable, planBackward, shiftLabels } from '../src/backward.js';
import { planForward } from '../src/forward.js';
import { loadModel } from '../src/model.js';
import { openSafetensors } from '../src/safetensors.js';
import { repoSource } from './fixtures.js';

const gpu = useGpu();

interface QuantGolden {
  path: string;
  batch: { input_ids: number[][]; labels: number[][]; counted_tokens: number };
  formats: Record<'q8_0', { loss: number }>;
  modules: {
    module: string;
    key_prefix: string;
    in_features: number;
    out_features: number;
    r: number;
    scaling: number;
  }[];
}
const goldens = import.meta.glob<QuantGolden>('../../train/test/golden/quant-train/*.json', { import: 'default' });

/** The runs whose q, k and v take one dispatch (planQkvMatmul). */
const QKV_IN_ONE = ['tiny-llama-q', 'tiny-llama3'];

/** The loss scale of the runs whose backward takes f16 tiles too (a power of two, as the trainer's). */
const S = 2 ** 12;
// The first case compiles most of the pipelines every later case reuses: minutes on lavapipe.

describe('a training step with f16 forward tiles against PEFT (Q8_0 base)', () => {
  const runs = ['tiny-llama-q', 'tiny-llama3', 'tiny-qwen2-q', 'tiny-qwen3-q', 'tiny-gpt2-q'];
  for (const [run, grads] of runs.flatMap((r) => (['f32', 'f16'] as const).map((g) => [r, g] as const))) {
    it(`${run}, backward products in ${grads}${grads === 'f16' ? ` at loss scale ${S}` : ''}`, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const golden = await (goldens[`../../train/test/golden/quant-train/${run}.json`] as () => Promise<QuantGolden>)();
      const tensors = await openSafetensors(
        await repoSource('packages/train/test/golden/quant-train'),
        `${run}.safetensors`,
      );
      const source = await repoSource(golden.path);
      const result = await gpuCase(ctx, `${run} f16 forward tiles`, async () => {
        const model = await loadModel(ctx, source, { precision: 'q8_0' });
        // A and B (and their gradients) are places in two arenas, as the trainer keeps them: what
        // q, k and v in one dispatch and the other fusions need.
        const shapes = golden.modules.flatMap((m) => [
          { shape: [m.r, m.in_features], label: `${m.module}.lora_A` },
          { shape: [m.out_features, m.r], label: `${m.module}.lora_B` },
        ]);
        const params = new TensorArena(ctx, shapes, 'params');
        const gradArena = new TensorArena(ctx, shapes, 'grads');
        const lora = new Map<string, LoraTrainable>();
        for (const [i, m] of golden.modules.entries()) {
          const [a, b, da, db] = [
            params.views[2 * i],
            params.views[2 * i + 1],
            gradArena.views[2 * i],
            gradArena.views[2 * i + 1],
          ];
          writeTensor(a as Tensor, await tensors.readTensor(`init.${m.key_prefix}.lora_A.weight`));
          writeTensor(b as Tensor, await tensors.readTensor(`init.${m.key_prefix}.lora_B.weight`));
          lora.set(m.module, { a: a as Tensor, b: b as Tensor, da: da as Tensor, db: db as Tensor, scale: m.scaling });
        }
        const B = golden.batch.input_ids.length;
        const T = (golden.batch.input_ids[0] as number[]).length;
        const fwd = await planForward(ctx, model, {
          B,
          T,
          mode: 'train',
          lora,
          tileMath: 'f16',
          qkvInOne: true,
          ropeInProjections: true,
          loraHInMatmul: true,
        });
        const state =
          grads === 'f16'
            ? tensorFromData(ctx, lossScaleInitialState({ initScale: S }), [4], 'f32', 'loss_scale')
            : undefined;
        const bwd = await planBackward(ctx, fwd, lora, state ? { lossScale: state } : {});
        const f16 = (list: readonly { kernel: { spec: { file: string; entryPoint: string } } }[]) =>
          list.filter((d) => d.kernel.spec.file.includes('tile_f16.wgsl')).map((d) => d.kernel.spec.entryPoint);
        const entries = { forward: f16(fwd.dispatches), backward: f16(bwd.dispatches) };
        // The attention's backward kernels read q, k and v rounded as the f16 forward staged them.
        const rounding = bwd.dispatches.filter((d) => d.kernel.constants.ROUND_F16 === true).length;
        const attentionBwd = bwd.dispatches.filter((d) => d.kernel.spec.entryPoint.startsWith('attention_bwd')).length;
        writeTensor(fwd.ids, golden.batch.input_ids.flat());
        writeTensor(bwd.labels, shiftLabels(golden.batch.labels.flat(), B, T));
        new StepEncoder(ctx, 'train step')
          .clear(fwd.embeddingErrors)
          .clear(bwd.errors)
          .dispatch(...fwd.dispatches, ...bwd.dispatches)
          .submit();
        const [loss, count] = await readFloat32(bwd.loss);
        const got = new Map<string, { da: Float32Array; db: Float32Array }>();
        // The scaled gradients divided by S: exact, S being a power of two.
        const unscale = (x: Float32Array) => (state ? x.map((v) => v / S) : x);
        for (const [name, t] of lora)
          got.set(name, { da: unscale(await readFloat32(t.da)), db: unscale(await readFloat32(t.db)) });
        state?.dispose();
        bwd.dispose();
        fwd.dispose();
        params.dispose();
        gradArena.dispose();
        const layers = model.config.numLayers;
        model.dispose();
        return { loss: loss as number, count: count as number, grads: got, entries, layers, rounding, attentionBwd };
      });
      // Every layer's q, k and v in one f16 dispatch where they take it (not with Qwen2's biases,
      // Qwen3's q/k norms or GPT-2's fused c_attn), projections forming LoRA's h in theirs; nothing
      // of the backward in f16 without a loss scale, and with one every layer's dx products and
      // the loss's dH.
      expect(result.entries.forward.filter((e) => e.startsWith('matmul_qkv')).length).toBe(
        QKV_IN_ONE.includes(run) ? result.layers : 0,
      );
      expect(result.entries.forward.filter((e) => e.startsWith('matmul_lora_h')).length).toBeGreaterThan(0);
      expect(result.entries.forward.filter((e) => e === 'attention_fwd').length).toBe(result.layers);
      if (grads === 'f32') expect(result.entries.backward).toEqual([]);
      else {
        const dx = result.entries.backward.filter((e) => e.startsWith('matmul'));
        expect(dx.length, result.entries.backward.join(' ')).toBeGreaterThanOrEqual(2 * result.layers);
        // The tiled attention's backward in its f16 build too (its forward staged q, k and v in f16).
        const attention = result.entries.backward.filter((e) => e.startsWith('attention_bwd'));
        expect(attention.length).toBe(result.attentionBwd);
        expect(dx.length + attention.length).toBe(result.entries.backward.length);
      }
      console.log(`${run} ${grads} backward f16 entries: ${[...new Set(result.entries.backward)].join(', ')}`);
      expect(result.rounding).toBe(result.attentionBwd);
      expect(result.rounding).toBeGreaterThanOrEqual(result.layers);
      expect(result.count).toBe(golden.batch.counted_tokens);
      const want = golden.formats.q8_0.loss;
      let worst = 0;
      for (const m of golden.modules) {
        const got = result.grads.get(m.module)!;
        for (const [which, g] of [
          ['A', got.da],
          ['B', got.db],
        ] as const) {
          const err = maxRelError(g, await tensors.readTensor(`q8_0.grad.${m.key_prefix}.lora_${which}.weight`));
          worst = Math.max(worst, err);
          expect(err, `${m.module} d${which}`).toBeLessThan(3e-2);
        }
      }
      console.log(
        `${run} f16 forward tiles, ${grads} backward: loss ${result.loss} (PEFT ${want}, Δ ${Math.abs(result.loss - want).toExponential(2)}), worst gradient error ${worst.toExponential(2)} over ${golden.modules.length} modules`,
      );
      expect(Math.abs(result.loss - want), `loss ${result.loss} vs PEFT ${want}`).toBeLessThan(5e-3);
    });
  }
});
