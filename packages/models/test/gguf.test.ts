// GGUF files as base models (gguf-model.ts) against transformers' own GGUF loader + PEFT on the
// same weights (tools/golden_gguf_train.py): Llama (q/k rows permuted by llama.cpp), Qwen2, Qwen3,
// GPT-2 (Conv1D stored [out, in]), and a Llama with Q4_K/Q6_K tensors and Llama 3 rope_freqs;
// each file mixes F32, F16, BF16, Q8_0 and Q4_0 tensors. The loader must keep every matrix as the
// reference did, name the source model, and one LoRA step must match: row 0's logits (≤ 2e-2),
// the loss (≤ 1e-4) and every gradient (≤ 1e-3 of its largest entry).
import { createTensor, readFloat32, StepEncoder, type Tensor, tensorFromData, writeTensor } from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { type LoraTrainable, planBackward, shiftLabels } from '../src/backward.js';
import { planForward } from '../src/forward.js';
import { GgufError } from '../src/gguf.js';
import { type CausalLM, loadModel } from '../src/model.js';
import type { WeightPrecision } from '../src/precision.js';
import { openSafetensors } from '../src/safetensors.js';
import { filesSource } from '../src/source.js';
import { repoSource } from './fixtures.js';

const gpu = useGpu();

interface GgufGolden {
  run: string;
  folder: string;
  file: string;
  precision: WeightPrecision | null;
  base_model: string;
  stored: Record<string, string>;
  batch: { input_ids: number[][]; labels: number[][]; counted_tokens: number };
  loss: number;
  modules: {
    module: string;
    key_prefix: string;
    in_features: number;
    out_features: number;
    r: number;
    scaling: number;
  }[];
}

const RUNS = ['tiny-llama-q', 'tiny-qwen2-q', 'tiny-qwen3-q', 'tiny-qwen3-q.as-q4_0', 'tiny-llama-k', 'tiny-gpt2-q'];
const goldens = import.meta.glob<GgufGolden>('../../train/test/golden/gguf-train/*.json', { import: 'default' });

/** The dtype of every matrix of the loaded model, by its Hugging Face name. */
function storedDTypes(model: CausalLM): Record<string, string> {
  const dtype = (t: { dtype: string }) => t.dtype;
  const out: Record<string, string> = { [model.layout.embed]: dtype(model.embed) };
  if (model.layout.positions && model.positions) out[model.layout.positions] = model.positions.dtype;
  if (model.layout.lmHead) out[model.layout.lmHead] = dtype(model.lmHead);
  for (const layer of model.layers) {
    for (const lin of Object.values(layer.linears)) out[`${lin.module.name}.weight`] = lin.w.dtype;
  }
  return out;
}

describe('GGUF base models against transformers + PEFT', () => {
  for (const run of RUNS) {
    it(run, async () => {
      const ctx = gpu();
      const golden = await (goldens[`../../train/test/golden/gguf-train/${run}.json`] as () => Promise<GgufGolden>)();
      const tensors = await openSafetensors(
        await repoSource('packages/train/test/golden/gguf-train'),
        `${run}.safetensors`,
      );
      const source = await repoSource(golden.folder);
      const result = await gpuCase(ctx, run, async () => {
        const model = await loadModel(ctx, source, {
          gguf: golden.file,
          ...(golden.precision ? { precision: golden.precision } : {}),
        });
        const stored = storedDTypes(model);
        const lora = new Map<string, LoraTrainable>();
        const owned: Tensor[] = [];
        for (const m of golden.modules) {
          const read = (w: 'A' | 'B') => tensors.readTensor(`init.${m.key_prefix}.lora_${w}.weight`);
          const a = tensorFromData(ctx, await read('A'), [m.r, m.in_features], 'f32', `${m.module}.lora_A`);
          const b = tensorFromData(ctx, await read('B'), [m.out_features, m.r], 'f32', `${m.module}.lora_B`);
          const da = createTensor(ctx, [m.r, m.in_features], 'f32', `${m.module}.dA`);
          const db = createTensor(ctx, [m.out_features, m.r], 'f32', `${m.module}.dB`);
          owned.push(a, b, da, db);
          lora.set(m.module, { a, b, da, db, scale: m.scaling });
        }
        const B = golden.batch.input_ids.length;
        const T = (golden.batch.input_ids[0] as number[]).length;
        const fwd = await planForward(ctx, model, { B, T, mode: 'train', logits: true, lora });
        const bwd = await planBackward(ctx, fwd, lora);
        writeTensor(fwd.ids, golden.batch.input_ids.flat());
        writeTensor(bwd.labels, shiftLabels(golden.batch.labels.flat(), B, T));
        new StepEncoder(ctx, 'step')
          .clear(fwd.embeddingErrors)
          .clear(bwd.errors)
          .dispatch(...fwd.dispatches, ...bwd.dispatches)
          .submit();
        const [loss] = await readFloat32(bwd.loss);
        const logits = (await readFloat32(fwd.logits!)).slice(0, T * model.config.vocabSize);
        const grads = new Map<string, Float32Array[]>();
        for (const [name, t] of lora) grads.set(name, [await readFloat32(t.da), await readFloat32(t.db)]);
        const info = { baseModelId: model.baseModelId, precision: model.precision };
        bwd.dispose();
        fwd.dispose();
        for (const t of owned) t.dispose();
        model.dispose();
        return { loss: loss as number, logits, grads, stored, info };
      });
      expect(result.stored).toEqual(golden.stored);
      expect(result.info.baseModelId).toBe(golden.base_model);
      expectClose(ctx, `${run} logits`, result.logits, await tensors.readTensor('logits_row0'), 2e-2, 0);
      expect(Math.abs(result.loss - golden.loss), `loss ${result.loss} vs ${golden.loss}`).toBeLessThan(1e-4);
      let worst = 0;
      for (const m of golden.modules) {
        const [da, db] = result.grads.get(m.module) as Float32Array[];
        for (const [w, got] of [
          ['A', da],
          ['B', db],
        ] as const) {
          const want = await tensors.readTensor(`grad.${m.key_prefix}.lora_${w}.weight`);
          const scale = want.reduce((s, v) => Math.max(s, Math.abs(v)), 0);
          const err =
            (got as Float32Array).reduce((s, v, i) => Math.max(s, Math.abs(v - (want[i] as number))), 0) / scale;
          worst = Math.max(worst, err);
          expect(err, `${m.module} d${w}`).toBeLessThan(1e-3);
        }
      }
      console.log(
        `${run}: loss ${result.loss} (PEFT ${golden.loss}), worst gradient error ${worst.toExponential(2)}, precision ${result.info.precision}`,
      );
    });
  }

  it('refuses a bad file before allocating any GPU memory', async () => {
    const ctx = gpu();
    const source = await repoSource('packages/models/test/fixtures/gguf/stories');
    const size = (await source.size('tiny-llama-q.gguf')) as number;
    const cut = await source.readRange('tiny-llama-q.gguf', 0, size - 1000);
    const live = ctx.liveBufferCount;
    const error = await loadModel(ctx, filesSource([new File([cut as BlobPart], 'cut.gguf')]), {
      gguf: 'cut.gguf',
    }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(GgufError);
    expect((error as Error).message).toMatch(/cut\.gguf, "[^"]+": truncated/);
    expect(ctx.liveBufferCount).toBe(live);
  });
});
