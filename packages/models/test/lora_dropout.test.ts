// LoRA dropout in a training step against PEFT whose lora_dropout modules apply the same mask
// (tools/golden_dropout.py writes webtune's counter-based hash again in numpy): the loss and every
// LoRA gradient of one step, with f32 weights, on Qwen3 and GPT-2 (Conv1D), all-linear, p = 0.3.
import {
  createTensor,
  dropoutCounter,
  readFloat32,
  StepEncoder,
  type Tensor,
  tensorFromData,
  writeTensor,
} from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { type LoraTrainable, planBackward, shiftLabels } from '../src/backward.js';
import { planForward } from '../src/forward.js';
import { loadModel } from '../src/model.js';
import { openSafetensors } from '../src/safetensors.js';
import { repoSource } from './fixtures.js';

const gpu = useGpu();

interface DropoutGolden {
  path: string;
  dropout: { p: number; seed: number; step: number; micro: number };
  batch: { input_ids: number[][]; labels: number[][] };
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

const goldens = import.meta.glob<DropoutGolden>('../../train/test/golden/dropout/*.json', { import: 'default' });

describe('LoRA dropout against PEFT with the same mask', () => {
  for (const run of ['tiny-qwen3', 'tiny-gpt2']) {
    for (const recompute of [false, true]) {
      it(`${run}${recompute ? ' with recomputed activations' : ''}`, async () => {
        const ctx = gpu();
        const golden = await (goldens[`../../train/test/golden/dropout/${run}.json`] as () => Promise<DropoutGolden>)();
        const tensors = await openSafetensors(
          await repoSource('packages/train/test/golden/dropout'),
          `${run}.safetensors`,
        );
        const source = await repoSource(golden.path);
        const out = await gpuCase(ctx, run, async () => {
          const model = await loadModel(ctx, source, { precision: 'f32' });
          const d = golden.dropout;
          const counter = tensorFromData(ctx, dropoutCounter(d.seed, d.step, d.micro), [4], 'u32', 'dropout_counter');
          const owned: Tensor[] = [counter];
          const lora = new Map<string, LoraTrainable>();
          for (const [i, m] of golden.modules.entries()) {
            const read = (w: 'A' | 'B') => tensors.readTensor(`init.${m.key_prefix}.lora_${w}.weight`);
            const a = tensorFromData(ctx, await read('A'), [m.r, m.in_features], 'f32', `${m.module}.lora_A`);
            const b = tensorFromData(ctx, await read('B'), [m.out_features, m.r], 'f32', `${m.module}.lora_B`);
            const da = createTensor(ctx, [m.r, m.in_features], 'f32', `${m.module}.dA`);
            const db = createTensor(ctx, [m.out_features, m.r], 'f32', `${m.module}.dB`);
            owned.push(a, b, da, db);
            lora.set(m.module, { a, b, da, db, scale: m.scaling, dropout: { p: d.p, module: i } });
          }
          const B = golden.batch.input_ids.length;
          const T = (golden.batch.input_ids[0] as number[]).length;
          const fwd = await planForward(ctx, model, { B, T, mode: 'train', recompute, lora, dropoutCounter: counter });
          const bwd = await planBackward(ctx, fwd, lora);
          writeTensor(fwd.ids, golden.batch.input_ids.flat());
          writeTensor(bwd.labels, shiftLabels(golden.batch.labels.flat(), B, T));
          new StepEncoder(ctx, 'step')
            .clear(fwd.embeddingErrors)
            .clear(bwd.errors)
            .dispatch(...fwd.dispatches, ...bwd.dispatches)
            .submit();
          const [loss] = await readFloat32(bwd.loss);
          const grads = new Map<string, Float32Array[]>();
          for (const [name, t] of lora) grads.set(name, [await readFloat32(t.da), await readFloat32(t.db)]);
          bwd.dispose();
          fwd.dispose();
          for (const t of owned) t.dispose();
          model.dispose();
          return { loss: loss as number, grads };
        });
        expect(Math.abs(out.loss - golden.loss) / golden.loss, `loss ${out.loss} vs ${golden.loss}`).toBeLessThan(1e-4);
        let worst = 0;
        for (const m of golden.modules) {
          const [da, db] = out.grads.get(m.module) as Float32Array[];
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
          `${run}${recompute ? ' (recompute)' : ''}: loss ${out.loss} (PEFT ${golden.loss}), worst gradient error ${worst.toExponential(2)}`,
        );
      });
    }
  }
});
