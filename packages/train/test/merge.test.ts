// Merging a PEFT-saved adapter into its base model (packages/train/test/golden/peft-train): the
// merged folder, loaded by webtune like any model, gives the logits and loss of the base model
// with the adapter applied (and PEFT's loss); the safetensors files keep the base's header bytes
// and every unadapted tensor's bytes; merged values are W0 + s·B·A (GPT-2: (B·A)ᵀ) rounded once
// from float64 to the checkpoint's dtype (F32, BF16, F16).
import {
  bf16BitsToF32,
  f16BitsToF32,
  type GpuContext,
  readFloat32,
  StepEncoder,
  type Tensor,
  writeTensor,
} from '@webtune/core';
import {
  type CausalLM,
  directorySource,
  evaluateLoss,
  filesSource,
  type LoraWeightsByModule,
  loadModel,
  loadModelConfig,
  type ModelSource,
  namedModules,
  openModelWeights,
  parseSafetensorsHeader,
  planForward,
  urlSource,
} from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { loadAdapter } from '../src/adapter.js';
import { readPeftAdapter } from '../src/lora/index.js';
import { memorySink, mergeAdapter, roundToBf16Bits, roundToF16Bits } from '../src/merge.js';

const gpu = useGpu();

interface Golden {
  path: string;
  batch: { input_ids: number[][]; labels: number[][] };
  adapter: { loss: number };
  loss_without_lora: number;
}
const goldens = import.meta.glob<Golden>('./golden/peft-train/*/golden.json', { import: 'default' });
const golden = (run: string) => (goldens[`./golden/peft-train/${run}/golden.json`] as () => Promise<Golden>)();

async function repoSource(relative: string): Promise<ModelSource> {
  if (typeof window !== 'undefined') return urlSource(new URL(`/${relative}/`, window.location.origin).href);
  const { fileURLToPath } = await import('node:url');
  return directorySource(fileURLToPath(new URL(`../../../${relative}`, import.meta.url)));
}

function memorySource(files: Map<string, Uint8Array>, description: string): ModelSource {
  return filesSource(
    [...files].map(([name, bytes]) => new File([bytes as Uint8Array<ArrayBuffer>], name)),
    description,
  );
}

/** Row 0's logits and the batch's loss, with or without an adapter. */
async function run(
  ctx: GpuContext,
  model: CausalLM,
  g: Golden,
  lora: LoraWeightsByModule | undefined,
): Promise<{ logits: Float32Array; loss: number }> {
  const B = g.batch.input_ids.length;
  const T = (g.batch.input_ids[0] as number[]).length;
  const plan = await planForward(ctx, model, { B, T, logits: true, lora });
  writeTensor(plan.ids, g.batch.input_ids.flat());
  new StepEncoder(ctx, 'forward')
    .clear(plan.embeddingErrors)
    .dispatch(...plan.dispatches)
    .submit();
  const logits = (await readFloat32(plan.logits as Tensor)).slice(0, T * model.config.vocabSize);
  plan.dispose();
  const examples = g.batch.input_ids.map((ids, b) => ({ inputIds: ids, labels: g.batch.labels[b] as number[] }));
  const { loss } = await evaluateLoss(ctx, model, examples, { batch: B, lora });
  return { logits, loss };
}

describe('merged model = base + adapter', () => {
  for (const name of ['tiny-llama-B', 'tiny-gpt2-B', 'tiny-gpt2-A']) {
    it(name, async () => {
      const ctx = gpu();
      const g = await golden(name);
      const base = await repoSource(g.path);
      const adapterDir = await repoSource(`packages/train/test/golden/peft-train/${name}/adapter`);
      const sink = memorySink();
      const config = await loadModelConfig(base);
      const imported = await readPeftAdapter(adapterDir, namedModules(config), config.modelType);
      const result = await mergeAdapter(base, imported, sink);
      expect(result.merged.length).toBe(imported.resolved.modules.length);
      expect(result.files).toEqual(
        expect.arrayContaining(['model.safetensors', 'config.json', 'generation_config.json', 'tokenizer.json']),
      );
      const merged = memorySource(sink.files, `merged ${name}`);
      const out = await gpuCase(ctx, name, async () => {
        const model = await loadModel(ctx, base, { precision: 'f32' });
        const adapter = await loadAdapter(ctx, model, adapterDir);
        const withAdapter = await run(ctx, model, g, adapter.weights);
        adapter.dispose();
        model.dispose();
        const mergedModel = await loadModel(ctx, merged, { precision: 'f32' });
        const fromMerged = await run(ctx, mergedModel, g, undefined);
        mergedModel.dispose();
        return { withAdapter, fromMerged };
      });
      expectClose(ctx, `${name} merged logits`, out.fromMerged.logits, out.withAdapter.logits, 2e-5, 2e-5);
      expect(Math.abs(out.fromMerged.loss - out.withAdapter.loss) / out.withAdapter.loss).toBeLessThan(1e-5);
      expect(Math.abs(out.fromMerged.loss - g.adapter.loss) / g.adapter.loss).toBeLessThan(1e-4);
      // The adapter matters: the base model alone is far from it.
      expect(Math.abs(g.loss_without_lora - g.adapter.loss) / g.adapter.loss).toBeGreaterThan(1e-2);
      let worst = 0;
      for (let i = 0; i < out.fromMerged.logits.length; i++) {
        worst = Math.max(worst, Math.abs((out.fromMerged.logits[i] as number) - (out.withAdapter.logits[i] as number)));
      }
      console.log(
        `${name}: loss merged ${out.fromMerged.loss} / base + adapter ${out.withAdapter.loss} / PEFT ${g.adapter.loss}; logits max |Δ| ${worst.toExponential(2)}`,
      );
    });
  }
});

describe('merged safetensors', () => {
  // F32 (tiny-llama), Conv1D (tiny-gpt2), BF16 (tiny-qwen2) and F16 (tiny-qwen3) checkpoints.
  for (const name of ['tiny-llama-A', 'tiny-gpt2-B', 'tiny-qwen2-B', 'tiny-qwen3-A']) {
    it(`${name}: same header, unadapted bytes kept, adapted = W0 + s·B·A rounded once`, async () => {
      const g = await golden(name);
      const base = await repoSource(g.path);
      const config = await loadModelConfig(base);
      const imported = await readPeftAdapter(
        await repoSource(`packages/train/test/golden/peft-train/${name}/adapter`),
        namedModules(config),
        config.modelType,
      );
      const sink = memorySink();
      // Small slices, so that tensors are merged over several row blocks.
      await mergeAdapter(base, imported, sink, { chunkBytes: 1000 });
      const size = (await base.size('model.safetensors')) as number;
      const original = await base.readRange('model.safetensors', 0, size);
      const merged = sink.files.get('model.safetensors') as Uint8Array;
      expect(merged.byteLength).toBe(original.byteLength);
      const header = parseSafetensorsHeader(original, 'model.safetensors');
      expect(merged.subarray(0, header.dataStart)).toEqual(original.subarray(0, header.dataStart));
      for (const name of ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']) {
        const n = (await base.size(name)) as number;
        expect(sink.files.get(name), name).toEqual(await base.readRange(name, 0, n));
      }
      // Checkpoint key -> adapted module (GPT-2 files may drop the 'transformer.' prefix).
      const byKey = new Map(
        imported.resolved.modules.flatMap((m) => [
          [`${m.name}.weight`, m],
          [`${m.name.replace(/^transformer\./, '')}.weight`, m],
        ]),
      );
      const weights = await openModelWeights(base);
      let checked = 0;
      let worstUlps = 0;
      for (const t of header.tensors.values()) {
        const got = merged.subarray(t.begin, t.end);
        const want = original.subarray(t.begin, t.end);
        const m = byKey.get(t.name);
        if (!m) {
          expect(got, t.name).toEqual(want);
          continue;
        }
        checked++;
        // Reference: the full delta B·A [out, in] in float64, transposed for Conv1D.
        const w = imported.weights.get(m.name) as { a: Float32Array; b: Float32Array };
        const w0 = await weights.readTensor(t.name);
        const delta = new Float64Array(m.outFeatures * m.inFeatures);
        for (let o = 0; o < m.outFeatures; o++)
          for (let i = 0; i < m.inFeatures; i++) {
            let s = 0;
            for (let k = 0; k < m.r; k++) s += (w.b[o * m.r + k] as number) * (w.a[k * m.inFeatures + i] as number);
            delta[o * m.inFeatures + i] = s;
          }
        const exact = (idx: number) => {
          const [rows, cols] = t.shape as [number, number];
          const row = Math.floor(idx / cols);
          const col = idx % cols;
          const d = m.kind === 'conv1d' ? (delta[col * rows + row] as number) : (delta[idx] as number);
          return (w0[idx] as number) + m.scale * d;
        };
        if (t.dtype === 'F32') {
          const values = new Float32Array(got.slice().buffer);
          for (let i = 0; i < values.length; i++) expect(values[i]).toBe(Math.fround(exact(i)));
        } else {
          const bits = new Uint16Array(got.slice().buffer);
          const decode = t.dtype === 'F16' ? f16BitsToF32 : bf16BitsToF32;
          const round = t.dtype === 'F16' ? roundToF16Bits : roundToBf16Bits;
          for (let i = 0; i < bits.length; i++) {
            const x = exact(i);
            const v = decode(bits[i] as number);
            // Correctly rounded: neither neighbour of the stored value is nearer the exact sum
            // (a NaN neighbour, past ±0 or ±inf, never is).
            const up = decode((bits[i] as number) + 1);
            const down = decode((bits[i] as number) - 1);
            const nearer = (n: number) => Math.abs(n - x) < Math.abs(v - x);
            expect(nearer(up) || nearer(down), `${t.name}[${i}]`).toBe(false);
            expect(bits[i]).toBe(round(x));
            worstUlps = Math.max(worstUlps, Math.abs(v - x) / Math.abs(up - v));
          }
        }
      }
      expect(checked).toBe(imported.resolved.modules.length);
      console.log(
        `${name}: ${checked} merged tensors checked${worstUlps > 0 ? ` (worst rounding ${worstUlps.toFixed(3)} ulp of the stored dtype)` : ' (exactly fround of the float64 sum)'}`,
      );
    });
  }
});
