// One LoRA training step's loss and every LoRA gradient against Hugging Face PEFT
// (tools/golden_peft_train.py): five architectures × two configurations plus stories260K, with
// f32 base weights. Gradient error is per tensor: max |g − g_peft| / max |g_peft| ≤ 1e-3.
import {
  attentionVariant,
  createTensor,
  loraGdBMaxRank,
  loraGradPairPays,
  normInMlpPays,
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
import {
  backwardDispatchCount,
  backwardLayout,
  GPU_ATTENTION,
  type LoraTrainable,
  planBackward,
  shiftLabels,
} from '../src/backward.js';
import { parseModelConfig } from '../src/config.js';
import { forwardDispatchCount, loraDaChunks, planForward } from '../src/forward.js';
import { loadModel } from '../src/model.js';
import { openSafetensors } from '../src/safetensors.js';
import { repoSource } from './fixtures.js';

const gpu = useGpu();

interface PeftGolden {
  model: string;
  config: string;
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
}

const RUNS = [
  'tiny-llama-A',
  'tiny-llama-B',
  'tiny-llama3-A',
  'tiny-llama3-B',
  'tiny-qwen2-A',
  'tiny-qwen2-B',
  'tiny-qwen3-A',
  'tiny-qwen3-B',
  'tiny-gpt2-A',
  'tiny-gpt2-B',
  'stories260K-A',
];
const goldens = import.meta.glob<PeftGolden>('../../train/test/golden/peft-train/*/golden.json', { import: 'default' });

describe('LoRA gradients against PEFT', () => {
  const cases = [
    ...RUNS.map((run) => ({ run, recompute: false, apart: false })),
    { run: 'tiny-qwen3-B', recompute: true, apart: false },
    { run: 'tiny-gpt2-A', recompute: true, apart: false },
    // o unadapted: norm2's backward in o's dx reads the replayed forward's mid and rstd.
    { run: 'tiny-llama-A', recompute: true, apart: false },
    // A caller's own LoRA tensors (apart, no arenas): no dA dispatch can take them all, so each
    // layer keeps its own (loraDaManyRefusal), reading g from the places the deferred plan gives it.
    { run: 'tiny-llama-B', recompute: false, apart: true },
  ];
  for (const { run, recompute, apart } of cases) {
    it(`${run}${recompute ? ' with recomputed activations' : ''}${apart ? ' with LoRA tensors apart' : ''}`, async () => {
      const ctx = gpu();
      const golden = await (
        goldens[`../../train/test/golden/peft-train/${run}/golden.json`] as () => Promise<PeftGolden>
      )();
      const runSource = await repoSource(`packages/train/test/golden/peft-train/${run}`);
      const tensors = await openSafetensors(runSource, 'tensors.safetensors');
      const model0 = await repoSource(golden.path);
      const result = await gpuCase(ctx, run, async () => {
        const model = await loadModel(ctx, model0, { precision: 'f32' });
        const lora = new Map<string, LoraTrainable>();
        // Without recomputation A and B (and their gradients) are places in two arenas, as in the
        // trainer: two adapted projections after one RMSNorm get their h from the norm's dispatch
        // and their g and dB from one lora_g_db_pair (forced: the planner keeps it to GPUs); with
        // it, tensors of their own and the dispatches one module at a time.
        const shapes = golden.modules.flatMap((m) => [
          { shape: [m.r, m.in_features], label: `${m.module}.lora_A` },
          { shape: [m.out_features, m.r], label: `${m.module}.lora_B` },
        ]);
        const arenas =
          recompute || apart ? [] : [new TensorArena(ctx, shapes, 'params'), new TensorArena(ctx, shapes, 'grads')];
        const owned: { dispose(): void }[] = [...arenas];
        const place = (i: number, arena: number, data?: Float32Array): Tensor => {
          const s = shapes[i] as { shape: number[]; label: string };
          const a = arenas[arena];
          const label = `${s.label}${arena === 1 ? '.grad' : ''}`;
          const t = a
            ? (a.views[i] as Tensor)
            : data
              ? tensorFromData(ctx, data, s.shape, 'f32', label)
              : createTensor(ctx, s.shape, 'f32', label);
          if (!a) owned.push(t);
          else if (data) writeTensor(t, data);
          return t;
        };
        for (const [i, m] of golden.modules.entries()) {
          const a = place(2 * i, 0, await tensors.readTensor(`${m.key_prefix}.lora_A.weight`));
          const b = place(2 * i + 1, 0, await tensors.readTensor(`${m.key_prefix}.lora_B.weight`));
          const da = place(2 * i, 1);
          const db = place(2 * i + 1, 1);
          lora.set(m.module, { a, b, da, db, scale: m.scaling });
        }
        const B = golden.batch.input_ids.length;
        const T = (golden.batch.input_ids[0] as number[]).length;
        // The GPU fusions on every adapter (layerFusions keeps them to GPUs): the norm before an
        // unadapted gated MLP inside its dispatch (forward.test.ts checks both plans), LoRA's h
        // inside the matmul of o, down, GPT-2's c_attn and c_proj (the B configurations), q, k and
        // v in one dispatch, and RoPE in the q and k projections' store.
        const fusions = { normInMlp: true, loraHInMatmul: true, qkvInOne: true, ropeInProjections: true };
        const fwd = await planForward(ctx, model, { B, T, mode: 'train', recompute, lora, ...fusions });
        // The second norm's backward in o's dx too, wherever o is unadapted (the A configurations),
        // and the tiled attention kernels: dq, dk and dv in one dispatch but with q/k norms (Qwen3).
        const bwd = await planBackward(ctx, fwd, lora, { pairGdB: !recompute, normInDx: true, attention: 'tiled' });
        // The planner's own count of this plan (the GPUs' numbers in the README come from it),
        // which assumes the trainer's arenas (with recomputation here the tensors are apart).
        const ranks = new Map([...lora].map(([name, t]) => [name, t.a.shape[0] as number]));
        if (!recompute && !apart) {
          // The forward's too: with the trainer's arenas, q, k and v are one dispatch where
          // qkvInOne says so (tiny-llama's and tiny-llama3's A configurations).
          expect(fwd.dispatches.length, `${run}: the counted forward dispatches`).toBe(
            forwardDispatchCount(model.config, ranks, B * T, { fusions }),
          );
        }
        // Every dA in one dispatch per chunk of layers (loraDaChunks) at the end, none per module:
        // all gradients below match PEFT with them formed there.
        const labels = bwd.dispatches.map((d) => d.label);
        if (apart)
          expect(
            labels.filter((l) => l.startsWith('lora_dA.')),
            `${run}: no dA chunk`,
          ).toEqual([]);
        if (!recompute && !apart) {
          const chunks = loraDaChunks(model.config, ranks, B * T);
          expect(labels.filter((l) => l.startsWith('lora_dA.')).length, `${run}: dA dispatches`).toBe(chunks.length);
          expect(
            labels.filter((l) => /\.(lora_dA|dA)\b/.test(l)),
            `${run}: dA per module`,
          ).toEqual([]);
        }
        if (!recompute && !apart)
          expect(bwd.dispatches.length, `${run}: the counted dispatches`).toBe(
            backwardDispatchCount(model.config, ranks, {
              rows: B * T,
              recompute,
              lossDispatches: bwd.crossEntropy.dispatches.length,
              pairGdB: !recompute,
              fusions,
              normInDx: true,
              attention: { tiled: true, maxBinding: ctx.limits.maxStorageBufferBindingSize },
            }),
          );
        writeTensor(fwd.ids, golden.batch.input_ids.flat());
        writeTensor(bwd.labels, shiftLabels(golden.batch.labels.flat(), B, T));
        const enc = new StepEncoder(ctx, 'train step').clear(fwd.embeddingErrors).clear(bwd.errors);
        enc.dispatch(...fwd.dispatches, ...bwd.dispatches).submit();
        const [loss, count] = await readFloat32(bwd.loss);
        const grads = new Map<string, { da: Float32Array; db: Float32Array }>();
        for (const [name, t] of lora) grads.set(name, { da: await readFloat32(t.da), db: await readFloat32(t.db) });
        bwd.dispose();
        fwd.dispose();
        for (const t of owned) t.dispose();
        model.dispose();
        return { loss: loss as number, count: count as number, grads };
      });
      expect(result.count).toBe(golden.batch.counted_tokens);
      expect(Math.abs(result.loss - golden.loss) / golden.loss, `loss ${result.loss} vs ${golden.loss}`).toBeLessThan(
        1e-4,
      );
      let worst = 0;
      for (const m of golden.modules) {
        const got = result.grads.get(m.module)!;
        for (const [which, g] of [
          ['A', got.da],
          ['B', got.db],
        ] as const) {
          const want = await tensors.readTensor(`grad.${m.key_prefix}.lora_${which}.weight`);
          const err = maxRelError(g, want);
          worst = Math.max(worst, err);
          expect(err, `${m.module} d${which}`).toBeLessThan(1e-3);
        }
      }
      console.log(
        `${run}: loss ${result.loss} (PEFT ${golden.loss}), worst gradient error ${worst.toExponential(2)} over ${golden.modules.length} modules`,
      );
    });
  }
});

// The backward stops at the lowest adapted layer (nothing below it, no dx of its input): adapters
// on layers 1.. only (PEFT's layers_to_transform) against the same adapters plus layer 0's with
// B = 0, whose forward is the same. Loss and every gradient of layers 1.. must agree, and each
// plan must have the dispatches backwardDispatchCount gives it.
describe('backward below the lowest adapted layer', () => {
  it('tiny-llama-A without layer 0 adapters: same loss and gradients, the counted dispatches', async () => {
    const ctx = gpu();
    const run = 'tiny-llama-A';
    const golden = await (
      goldens[`../../train/test/golden/peft-train/${run}/golden.json`] as () => Promise<PeftGolden>
    )();
    const tensors = await openSafetensors(
      await repoSource(`packages/train/test/golden/peft-train/${run}`),
      'tensors.safetensors',
    );
    const source = await repoSource(golden.path);
    const step = async (withLayer0: boolean) =>
      gpuCase(ctx, `${run} layer 0 ${withLayer0}`, async () => {
        const model = await loadModel(ctx, source, { precision: 'f32' });
        // A and B (and their gradients) are places in two arenas, as in the trainer, which the
        // counted dispatches assume (two adapted projections' LoRA terms in one dx dispatch).
        const modules = golden.modules.filter((m) => withLayer0 || !m.module.includes('.layers.0.'));
        const shapes = modules.flatMap((m) => [
          { shape: [m.r, m.in_features], label: `${m.module}.lora_A` },
          { shape: [m.out_features, m.r], label: `${m.module}.lora_B` },
        ]);
        const arenas = [new TensorArena(ctx, shapes, 'params'), new TensorArena(ctx, shapes, 'grads')] as const;
        const owned = [...arenas];
        const lora = new Map<string, LoraTrainable>();
        for (const [i, m] of modules.entries()) {
          const layer0 = m.module.includes('.layers.0.');
          const bData = await tensors.readTensor(`${m.key_prefix}.lora_B.weight`);
          const [a, b] = [arenas[0].views[2 * i] as Tensor, arenas[0].views[2 * i + 1] as Tensor];
          writeTensor(a, await tensors.readTensor(`${m.key_prefix}.lora_A.weight`));
          writeTensor(b, layer0 ? new Float32Array(bData.length) : bData);
          lora.set(m.module, {
            a,
            b,
            da: arenas[1].views[2 * i] as Tensor,
            db: arenas[1].views[2 * i + 1] as Tensor,
            scale: m.scaling,
          });
        }
        const B = golden.batch.input_ids.length;
        const T = (golden.batch.input_ids[0] as number[]).length;
        const fwd = await planForward(ctx, model, { B, T, mode: 'train', lora });
        const bwd = await planBackward(ctx, fwd, lora);
        writeTensor(fwd.ids, golden.batch.input_ids.flat());
        writeTensor(bwd.labels, shiftLabels(golden.batch.labels.flat(), B, T));
        const enc = new StepEncoder(ctx, 'train step').clear(fwd.embeddingErrors).clear(bwd.errors);
        enc.dispatch(...fwd.dispatches, ...bwd.dispatches).submit();
        const [loss] = await readFloat32(bwd.loss);
        const grads = new Map<string, Float32Array[]>();
        for (const [name, g] of lora) grads.set(name, [await readFloat32(g.da), await readFloat32(g.db)]);
        const dispatches = bwd.dispatches.length;
        // The planner's own count, which estimateMemory uses: layers below the lowest adapted one
        // and its input's dx must be left out there too.
        const ranks = new Map([...lora].map(([name, t]) => [name, t.a.shape[0] as number]));
        const counted = backwardDispatchCount(model.config, ranks, {
          rows: B * T,
          lossDispatches: bwd.crossEntropy.dispatches.length,
          pairGdB: loraGradPairPays(ctx),
          gdBMaxRank: loraGdBMaxRank(ctx),
          normInDx: normInMlpPays(ctx),
          attention: { tiled: attentionVariant(ctx) === 'tiled', maxBinding: ctx.limits.maxStorageBufferBindingSize },
        });
        expect(dispatches, `layer 0 adapted: ${withLayer0}`).toBe(counted);
        bwd.dispose();
        fwd.dispose();
        for (const x of owned) x.dispose();
        model.dispose();
        return { loss: loss as number, grads, dispatches };
      });
    const all = await step(true);
    const above = await step(false);
    expect(above.grads.size).toBeGreaterThan(0);
    expect(above.grads.size).toBeLessThan(all.grads.size);
    expect(Math.abs(above.loss - all.loss) / all.loss).toBeLessThan(1e-6);
    for (const [name, [da, db]] of above.grads) {
      const [wantA, wantB] = all.grads.get(name) as Float32Array[];
      expect(maxRelError(da as Float32Array, wantA as Float32Array), `${name} dA`).toBeLessThan(1e-5);
      expect(maxRelError(db as Float32Array, wantB as Float32Array), `${name} dB`).toBeLessThan(1e-5);
    }
    expect(above.dispatches).toBeLessThan(all.dispatches);
    console.log(`${run}: backward dispatches ${all.dispatches} with layer 0 adapted, ${above.dispatches} without`);
  }, 300_000);
});

describe("attention's backward in one dispatch", () => {
  it('stays two where the range holding ∂L/∂q, k and v is over the binding limit', async () => {
    // SmolLM2-135M's shape, q_proj,v_proj at r = 8: the range is about rows × 960 × 4 bytes, over
    // WebGPU's default 128 MiB past 34,952 rows.
    const source = await repoSource('packages/train/test/fixtures/configs/SmolLM2-135M');
    const config = parseModelConfig(JSON.parse((await source.readText('config.json')) as string));
    const ranks = new Map<string, number>();
    for (let i = 0; i < config.numLayers; i++) {
      for (const m of ['q_proj', 'v_proj']) ranks.set(`model.layers.${i}.self_attn.${m}`, 8);
    }
    const plan = (B: number, T: number) => ({
      delta: backwardLayout(config, ranks, { B, T }).some((b) => b.label === 'attention_delta'),
      count: backwardDispatchCount(config, ranks, { rows: B * T, lossDispatches: 0 }),
      cpu: backwardDispatchCount(config, ranks, {
        rows: B * T,
        lossDispatches: 0,
        attention: { ...GPU_ATTENTION, tiled: false },
      }),
    });
    const small = plan(4, 128);
    const large = plan(9, 4000);
    expect(small.delta).toBe(false);
    expect(large.delta).toBe(true);
    // One dispatch per layer fewer than the two-dispatch kernels (the rows kernels' count), where it fits.
    expect(small.cpu - small.count).toBe(config.numLayers);
    expect(large.cpu - large.count).toBe(0);
  });
});
