// An embedding and LM head split by rows (core's table.ts), as loadModel does when a vocabulary
// table is larger than one binding may be: tablePartBytes is lowered here so that the tiny
// fixtures' tables come in parts. The logits (a matmul per part), the chunked loss and its
// gradient (chunks per part), greedy generation (embedding lookups per part) and a training step
// must match the same goldens as the whole tables.
import {
  createTensor,
  readFloat32,
  SplitRows,
  StepEncoder,
  type Tensor,
  tensorFromData,
  writeTensor,
} from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { type LoraTrainable, planBackward, shiftLabels } from '../src/backward.js';
import { planForward } from '../src/forward.js';
import { Generator } from '../src/generate.js';
import { loadModel } from '../src/model.js';
import { openSafetensors } from '../src/safetensors.js';
import { fixturePath, forwardGolden, repoSource } from './fixtures.js';

const gpu = useGpu();

describe('vocabulary tables split by rows', () => {
  it('tiny-llama (untied, f16): logits and greedy generation as with whole tables', async () => {
    const ctx = gpu();
    const golden = await forwardGolden('tiny-llama');
    const source = await repoSource(fixturePath('tiny-llama'));
    await gpuCase(ctx, 'split tiny-llama', async () => {
      // 512 × 48 halves = 48 KiB per table: parts of at most 20,000 bytes are three of 172/172/168 rows.
      const model = await loadModel(ctx, source, { precision: 'f16', tablePartBytes: 20_000 });
      expect(model.embed).toBeInstanceOf(SplitRows);
      expect(model.lmHead).toBeInstanceOf(SplitRows);
      expect((model.embed as SplitRows).parts.map((p) => p.shape[0])).toEqual([172, 172, 168]);
      const B = golden.input_ids.length;
      const T = (golden.input_ids[0] as number[]).length;
      const plan = await planForward(ctx, model, { B, T, logits: true });
      writeTensor(plan.ids, golden.input_ids.flat());
      new StepEncoder(ctx, 'forward')
        .clear(plan.embeddingErrors)
        .dispatch(...plan.dispatches)
        .submit();
      expectClose(ctx, 'split logits', await readFloat32(plan.logits!), golden.logits_f16_weights.data, 2e-2, 0);
      plan.dispose();
      const gen = await Generator.create(ctx, model, { maxSequence: 40, tileMath: 'f32' });
      const g = golden.generate;
      const r = await gen.generate(g.prompt, { maxNewTokens: g.new_tokens, temperature: 0, stopTokens: [] });
      gen.dispose();
      model.dispose();
      // f16 weights: the first tokens, whose margins are wide, are the f32 golden's.
      expect(r.ids.slice(0, 5)).toEqual(g.new_ids.slice(0, 5));
    });
  });

  it('tiny-gpt2 (tied wte): loss and LoRA gradients of a step against PEFT', async () => {
    const ctx = gpu();
    const run = 'tiny-gpt2-A';
    const dir = `packages/train/test/golden/peft-train/${run}`;
    const golden = JSON.parse((await (await repoSource(dir)).readText('golden.json')) as string) as {
      path: string;
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
    };
    const tensors = await openSafetensors(await repoSource(dir), 'tensors.safetensors');
    const source = await repoSource(golden.path);
    const out = await gpuCase(ctx, 'split tiny-gpt2', async () => {
      // wte 384 × 60 f32 = 90 KiB: parts of at most 32,768 bytes are three of 128 rows.
      const model = await loadModel(ctx, source, { precision: 'f32', tablePartBytes: 32_768 });
      expect((model.lmHead as SplitRows).parts.length).toBe(3);
      const lora = new Map<string, LoraTrainable>();
      const owned: Tensor[] = [];
      for (const m of golden.modules) {
        const read = (w: 'A' | 'B') => tensors.readTensor(`${m.key_prefix}.lora_${w}.weight`);
        const a = tensorFromData(ctx, await read('A'), [m.r, m.in_features], 'f32', `${m.module}.lora_A`);
        const b = tensorFromData(ctx, await read('B'), [m.out_features, m.r], 'f32', `${m.module}.lora_B`);
        const da = createTensor(ctx, [m.r, m.in_features], 'f32', `${m.module}.dA`);
        const db = createTensor(ctx, [m.out_features, m.r], 'f32', `${m.module}.dB`);
        owned.push(a, b, da, db);
        lora.set(m.module, { a, b, da, db, scale: m.scaling });
      }
      const B = golden.batch.input_ids.length;
      const T = (golden.batch.input_ids[0] as number[]).length;
      const fwd = await planForward(ctx, model, { B, T, mode: 'train', lora });
      // One loss chunk per part.
      const bwd = await planBackward(ctx, fwd, lora);
      expect(bwd.crossEntropy.chunks).toBe(3);
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
    expect(Math.abs(out.loss - golden.loss) / golden.loss).toBeLessThan(1e-4);
    for (const m of golden.modules) {
      const [da, db] = out.grads.get(m.module) as Float32Array[];
      for (const [w, got] of [
        ['A', da],
        ['B', db],
      ] as const) {
        const want = await tensors.readTensor(`grad.${m.key_prefix}.lora_${w}.weight`);
        const scale = want.reduce((s, v) => Math.max(s, Math.abs(v)), 0);
        expectClose(ctx, `${m.module} d${w}`, got as Float32Array, want, 1e-3 * scale, 0);
      }
    }
  });
});
