// A block-quantized frozen base (QLoRA) against transformers + PEFT on the same weights
// (tools/golden_quant_train.py): every architecture at q8_0 and q4_0, one LoRA training step
// (all-linear, so the backward's dy·W runs through every quantized weight). The loader must store
// each matrix as the reference did (quantized, or f16 for embeddings, the LM head and inputs that
// are not a multiple of 32); the logits of row 0 (max |Δ| ≤ 2e-2) and the loss (≤ 1e-4) within the
// f16 forward tests' tolerances, and every LoRA gradient within the f32 ones (max |g − g_peft| /
// max |g_peft| ≤ 1e-3): the GPU dequantizes to exactly the reference's values, so only the order
// of f32 arithmetic differs.
import { createTensor, readFloat32, StepEncoder, type Tensor, tensorFromData, writeTensor } from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { maxRelError } from '../../core/ref/check.js';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { type LoraTrainable, planBackward, shiftLabels } from '../src/backward.js';
import { planForward } from '../src/forward.js';
import { type CausalLM, loadModel } from '../src/model.js';
import { openSafetensors } from '../src/safetensors.js';
import { repoSource } from './fixtures.js';

const gpu = useGpu();

interface QuantGolden {
  model: string;
  path: string;
  batch: { input_ids: number[][]; labels: number[][]; counted_tokens: number };
  formats: Record<'q8_0' | 'q4_0', { loss: number; stored: Record<string, string> }>;
  modules: {
    module: string;
    key_prefix: string;
    in_features: number;
    out_features: number;
    r: number;
    scaling: number;
  }[];
}

const RUNS = ['tiny-llama-q', 'tiny-qwen2-q', 'tiny-qwen3-q', 'tiny-gpt2-q', 'tiny-llama3'];
const goldens = import.meta.glob<QuantGolden>('../../train/test/golden/quant-train/*.json', { import: 'default' });

/** The dtype of every matrix of the loaded model, by its Hugging Face name. */
function storedDTypes(model: CausalLM): Record<string, string> {
  const out: Record<string, string> = { [model.layout.embed]: model.embed.dtype };
  if (model.layout.positions && model.positions) out[model.layout.positions] = model.positions.dtype;
  if (model.layout.lmHead) out[model.layout.lmHead] = model.lmHead.dtype;
  for (const layer of model.layers) {
    for (const lin of Object.values(layer.linears)) out[`${lin.module.name}.weight`] = lin.w.dtype;
  }
  return out;
}

describe('LoRA on a quantized base against PEFT on the same weights', () => {
  for (const run of RUNS) {
    for (const precision of ['q8_0', 'q4_0'] as const) {
      it(`${run} at ${precision}`, async () => {
        const ctx = gpu();
        const golden = await (
          goldens[`../../train/test/golden/quant-train/${run}.json`] as () => Promise<QuantGolden>
        )();
        const want = golden.formats[precision];
        const tensors = await openSafetensors(
          await repoSource('packages/train/test/golden/quant-train'),
          `${run}.safetensors`,
        );
        const source = await repoSource(golden.path);
        const result = await gpuCase(ctx, `${run} ${precision}`, async () => {
          const model = await loadModel(ctx, source, { precision });
          const stored = storedDTypes(model);
          const lora = new Map<string, LoraTrainable>();
          const owned: Tensor[] = [];
          for (const m of golden.modules) {
            const read = (which: 'A' | 'B') => tensors.readTensor(`init.${m.key_prefix}.lora_${which}.weight`);
            const a = tensorFromData(ctx, await read('A'), [m.r, m.in_features], 'f32', `${m.module}.lora_A`);
            const b = tensorFromData(ctx, await read('B'), [m.out_features, m.r], 'f32', `${m.module}.lora_B`);
            const da = createTensor(ctx, [m.r, m.in_features], 'f32', `${m.module}.lora_A.grad`);
            const db = createTensor(ctx, [m.out_features, m.r], 'f32', `${m.module}.lora_B.grad`);
            owned.push(a, b, da, db);
            lora.set(m.module, { a, b, da, db, scale: m.scaling });
          }
          const B = golden.batch.input_ids.length;
          const T = (golden.batch.input_ids[0] as number[]).length;
          const fwd = await planForward(ctx, model, { B, T, mode: 'train', logits: true, lora });
          const bwd = await planBackward(ctx, fwd, lora);
          writeTensor(fwd.ids, golden.batch.input_ids.flat());
          writeTensor(bwd.labels, shiftLabels(golden.batch.labels.flat(), B, T));
          new StepEncoder(ctx, 'train step')
            .clear(fwd.embeddingErrors)
            .clear(bwd.errors)
            .dispatch(...fwd.dispatches, ...bwd.dispatches)
            .submit();
          const [loss, count] = await readFloat32(bwd.loss);
          const V = model.config.vocabSize;
          const logitsRow0 = (await readFloat32(fwd.logits!)).slice(0, T * V);
          const grads = new Map<string, { da: Float32Array; db: Float32Array }>();
          for (const [name, t] of lora) grads.set(name, { da: await readFloat32(t.da), db: await readFloat32(t.db) });
          bwd.dispose();
          fwd.dispose();
          for (const t of owned) t.dispose();
          model.dispose();
          return { loss: loss as number, count: count as number, grads, stored, logitsRow0 };
        });
        expect(result.stored).toEqual(want.stored);
        expect(result.count).toBe(golden.batch.counted_tokens);
        expectClose(
          ctx,
          `${run} ${precision} logits`,
          result.logitsRow0,
          await tensors.readTensor(`${precision}.logits_row0`),
          2e-2,
          0,
        );
        expect(Math.abs(result.loss - want.loss), `loss ${result.loss} vs ${want.loss}`).toBeLessThan(1e-4);
        let worst = 0;
        for (const m of golden.modules) {
          const got = result.grads.get(m.module)!;
          for (const [which, g] of [
            ['A', got.da],
            ['B', got.db],
          ] as const) {
            const err = maxRelError(
              g,
              await tensors.readTensor(`${precision}.grad.${m.key_prefix}.lora_${which}.weight`),
            );
            worst = Math.max(worst, err);
            expect(err, `${m.module} d${which}`).toBeLessThan(1e-3);
          }
        }
        console.log(
          `${run} ${precision}: loss ${result.loss} (PEFT ${want.loss}), worst gradient error ${worst.toExponential(2)} over ${golden.modules.length} modules`,
        );
      });
    }
  }
});
