// Inference plans asking for f16 tiles (ForwardOptions.tileMath: shaders/tile_f16.wgsl, in the
// projections and the tiled attention) against Hugging Face transformers running the same
// f16-rounded weights in f32 (tools/golden_forward.py): logits and loss of every fixture
// architecture, beside the same plan with f32 tiles. The f16 case runs where the adapter has
// shader-f16 (the node-lavapipe-f16 project: Mesa 25 lavapipe) and skips elsewhere. Its bounds are
// f16's, not a golden's: measured, the loss is within 1.8e-3 of transformers' and the logits
// within 0.12 (tiny-llama; 0.068 and 0.082 for tiny-llama3 and tiny-qwen2, 0.013 to 0.019 with
// Qwen3's q/k norms, GPT-2 and stories260K), since without q/k norms the tiny models' sharp
// attention scores amplify the f16 rounding of q and k. f32 tiles stay within 2e-2 (measured
// 3e-5).
import {
  inferenceTileMath,
  readFloat32,
  StepEncoder,
  type Tensor,
  type TileMath,
  tensorFromData,
  writeTensor,
} from '@webtune/core';
import { describe, expect, inject, it } from 'vitest';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { type LoraModuleWeights, planForward } from '../src/forward.js';
import { Generator } from '../src/generate.js';
import { loadModel } from '../src/model.js';
import { openSafetensors } from '../src/safetensors.js';
import { causalLmLoss, FIXTURES, f16MathGolden, fixturePath, forwardGolden, repoSource } from './fixtures.js';

const gpu = useGpu();
/** How many times transformers' own f16 deviation the f16 tiles may have (see below). */
const F16_VS_TRANSFORMERS = 2;

/** Root mean square and largest |got − want|. */
function deviation(got: ArrayLike<number>, want: ArrayLike<number>): { rms: number; max: number } {
  let ss = 0;
  let max = 0;
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs((got[i] as number) - (want[i] as number));
    ss += d * d;
    max = Math.max(max, d);
  }
  return { rms: Math.sqrt(ss / want.length), max };
}

describe('inference forward with f16 tiles against transformers (f16 weights)', () => {
  for (const name of FIXTURES) {
    for (const tileMath of ['f32', 'f16'] as const satisfies readonly TileMath[]) {
      it(`${name}, ${tileMath} tiles`, async (t) => {
        const ctx = gpu();
        if (tileMath === 'f16' && !ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
        // The other projects run the f32 tiles in the CPU adapters' plan; this project keeps one
        // fixture of them in the GPU plan (q, k and v in one dispatch, RoPE in their store).
        if (tileMath === 'f32' && inject('featureBuildsOnly') && name !== 'stories260K')
          t.skip('f32 tiles: the other projects run them, and stories260K here');
        const golden = await forwardGolden(name);
        const source = await repoSource(fixturePath(name));
        const B = golden.input_ids.length;
        const T = (golden.input_ids[0] as number[]).length;
        const out = await gpuCase(ctx, `${name} ${tileMath}`, async () => {
          const model = await loadModel(ctx, source, { precision: 'f16' });
          const plan = await planForward(ctx, model, { B, T, logits: true, mode: 'inference', tileMath });
          // Products of f32 tensors, LoRA terms and matrix-vector shapes keep f32; the plan's
          // projections of f16 weights must get f16 tiles.
          const f16Dispatches = plan.dispatches.filter((d) => d.kernel.spec.file.includes('tile_f16.wgsl')).length;
          // The tiled attention (GPU kernels) takes f16 tiles too, one per layer.
          const f16Attention = plan.dispatches.filter(
            (d) => d.kernel.spec.entryPoint === 'attention_fwd' && d.kernel.spec.file.includes('tile_f16.wgsl'),
          ).length;
          writeTensor(plan.ids, golden.input_ids.flat());
          new StepEncoder(ctx, 'forward')
            .clear(plan.embeddingErrors)
            .dispatch(...plan.dispatches)
            .submit();
          const logits = await readFloat32(plan.logits!);
          plan.dispose();
          model.dispose();
          const tiled = plan.dispatches.some((d) => d.kernel.spec.entryPoint === 'attention_fwd');
          return { logits, f16Dispatches, f16Attention, tiled, layers: model.config.numLayers };
        });
        if (tileMath === 'f16') expect(out.f16Dispatches).toBeGreaterThan(0);
        else expect(out.f16Dispatches).toBe(0);
        expect(out.f16Attention).toBe(tileMath === 'f16' && out.tiled ? out.layers : 0);
        const logitsTol = tileMath === 'f16' ? 0.25 : 2e-2;
        expectClose(ctx, `${name} ${tileMath} tiles logits`, out.logits, golden.logits_f16_weights.data, logitsTol, 0);
        const loss = causalLmLoss(out.logits, golden.input_ids, golden.vocab_size);
        console.log(`${name} ${tileMath} tiles: loss ${loss}, transformers ${golden.loss_f16_weights}`);
        expect(Math.abs(loss - golden.loss_f16_weights), `loss ${loss} vs ${golden.loss_f16_weights}`).toBeLessThan(
          tileMath === 'f16' ? 5e-3 : 1e-4,
        );
        if (tileMath === 'f16') {
          // Against transformers computing in f16 (every weight and activation f16,
          // tools/golden_f16_math.py): f16 tiles may miss the f32 reference by at most
          // F16_VS_TRANSFORMERS times the root mean square by which transformers' f16 logits miss it.
          const hf = await f16MathGolden(name);
          expect(hf.generated_by.dtype).toBe('float16');
          expect(hf.input_ids).toEqual(golden.input_ids);
          expect(hf.logits_f16_math.shape).toEqual(golden.logits_f16_weights.shape);
          const want = golden.logits_f16_weights.data;
          const ours = deviation(out.logits, want);
          const theirs = deviation(hf.logits_f16_math.data, want);
          console.log(
            `${name} f16 tiles from the f32 reference: logits rms ${ours.rms.toExponential(2)}, max ${ours.max.toFixed(4)}; ` +
              `transformers in f16: rms ${theirs.rms.toExponential(2)}, max ${theirs.max.toFixed(4)}`,
          );
          expect(theirs.rms, 'the golden file').toBeCloseTo(hf.deviation.logits_rms, 5);
          expect(ours.rms, `${name} logits rms against transformers' f16 ${theirs.rms}`).toBeLessThanOrEqual(
            F16_VS_TRANSFORMERS * theirs.rms,
          );
        }
      });
    }
  }
});

// An adapter on a Q8_0 base with f16 tiles (the studio trying an adapter beside the base): the
// adapted projections' LoRA term is read and multiplied in f32 beside the f16 tiles
// (matmul.wgsl's low_rank_direct). Against PEFT on the same dequantized weights with the same
// seeded, non-zero A and B (tools/golden_quant_train.py; all-linear, r = 4), with f16's bounds as
// above; the same plan without the adapter must miss PEFT's loss by more than those bounds, so
// the LoRA term is what is being checked.
interface QuantGolden {
  path: string;
  batch: { input_ids: number[][]; labels: number[][] };
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
const quantGoldens = import.meta.glob<QuantGolden>('../../train/test/golden/quant-train/*.json', { import: 'default' });

describe('inference with a LoRA adapter and f16 tiles against PEFT (Q8_0 base)', () => {
  for (const run of ['tiny-llama-q', 'tiny-qwen3-q']) {
    it(run, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const golden = await (
        quantGoldens[`../../train/test/golden/quant-train/${run}.json`] as () => Promise<QuantGolden>
      )();
      const tensors = await openSafetensors(
        await repoSource('packages/train/test/golden/quant-train'),
        `${run}.safetensors`,
      );
      const source = await repoSource(golden.path);
      const ids = golden.batch.input_ids;
      const B = ids.length;
      const T = (ids[0] as number[]).length;
      const out = await gpuCase(ctx, `${run} LoRA f16 tiles`, async () => {
        const model = await loadModel(ctx, source, { precision: 'q8_0' });
        const lora = new Map<string, LoraModuleWeights>();
        const owned: Tensor[] = [];
        for (const m of golden.modules) {
          const read = (which: 'A' | 'B') => tensors.readTensor(`init.${m.key_prefix}.lora_${which}.weight`);
          const a = tensorFromData(ctx, await read('A'), [m.r, m.in_features], 'f32', `${m.module}.lora_A`);
          const b = tensorFromData(ctx, await read('B'), [m.out_features, m.r], 'f32', `${m.module}.lora_B`);
          owned.push(a, b);
          lora.set(m.module, { a, b, scale: m.scaling });
        }
        const run = async (withLora: boolean) => {
          const plan = await planForward(ctx, model, {
            B,
            T,
            logits: true,
            mode: 'inference',
            tileMath: 'f16',
            ...(withLora ? { lora } : {}),
          });
          const direct = plan.dispatches.filter((d) => d.kernel.constants.LR_DIRECT === true).length;
          writeTensor(plan.ids, ids.flat());
          new StepEncoder(ctx, 'forward')
            .clear(plan.embeddingErrors)
            .dispatch(...plan.dispatches)
            .submit();
          const logits = await readFloat32(plan.logits!);
          plan.dispose();
          return { logits, direct };
        };
        const adapted = await run(true);
        const base = await run(false);
        for (const x of owned) x.dispose();
        const V = model.config.vocabSize;
        model.dispose();
        return { adapted, base, V };
      });
      // Every adapted projection of f16 weights takes the f16 build with its LoRA term in f32.
      expect(out.adapted.direct).toBeGreaterThan(0);
      expect(out.base.direct).toBe(0);
      const want = golden.formats.q8_0.loss;
      const loss = causalLmLoss(out.adapted.logits, golden.batch.labels, out.V);
      const baseLoss = causalLmLoss(out.base.logits, golden.batch.labels, out.V);
      console.log(`${run}: loss with the adapter ${loss}, without ${baseLoss}, PEFT ${want}`);
      expectClose(
        ctx,
        `${run} LoRA f16 tiles logits (row 0)`,
        out.adapted.logits.slice(0, T * out.V),
        await tensors.readTensor('q8_0.logits_row0'),
        0.25,
        0,
      );
      expect(Math.abs(loss - want), `loss ${loss} vs PEFT ${want}`).toBeLessThan(5e-3);
      expect(Math.abs(baseLoss - want), `without the adapter ${baseLoss} vs PEFT ${want}`).toBeGreaterThan(5e-3);
    });
  }
});

// Generation with f16 tiles (Generator's tileMath: the prefill's projections and the attention of
// prefill and decode in f16): stories260K, a trained model, continues its BOS prompt greedily with
// the same 20 tokens as the same f16 weights with f32 tiles.
describe('greedy generation with f16 tiles', () => {
  it('stories260K continues as with f32 tiles', async (t) => {
    const ctx = gpu();
    const golden = await forwardGolden('stories260K');
    const source = await repoSource(fixturePath('stories260K'));
    const prompt = golden.generate_bos?.prompt ?? golden.generate.prompt;
    const out = await gpuCase(ctx, 'generate f16 tiles', async () => {
      const model = await loadModel(ctx, source, { precision: 'f16' });
      if (!ctx.features.shaderF16) {
        await expect(Generator.create(ctx, model, { maxSequence: 40, tileMath: 'f16' })).rejects.toThrow(/shader-f16/);
        model.dispose();
        return undefined;
      }
      const ids: Record<TileMath | 'default', number[]> = { f32: [], f16: [], default: [] };
      const f16Attention: Record<TileMath | 'default', number> = { f32: 0, f16: 0, default: 0 };
      // Left unset, tileMath is inferenceTileMath's: f16 here (shader-f16, GPU kernels forced).
      for (const tileMath of ['f32', 'f16', 'default'] as const) {
        const gen = await Generator.create(ctx, model, {
          maxSequence: 40,
          ...(tileMath === 'default' ? {} : { tileMath }),
        });
        f16Attention[tileMath] = gen.decodeDispatches.filter(
          (d) => d.kernel.spec.entryPoint === 'attention_fwd' && d.kernel.spec.file.includes('tile_f16.wgsl'),
        ).length;
        const r = await gen.generate(prompt, { maxNewTokens: 20, temperature: 0, stopTokens: [] });
        ids[tileMath] = r.ids;
        gen.dispose();
      }
      const layers = model.config.numLayers;
      model.dispose();
      return { ids, f16Attention, layers };
    });
    if (!out) t.skip('no shader-f16 on this adapter (refused, as it should be)');
    else {
      // The decode step's attention (tiled: this project forces the GPU kernels) is the f16 build.
      // This project forces the GPU kernels on an adapter with shader-f16: the default is f16 here.
      if (ctx.kernelProfile === 'gpu') expect(inferenceTileMath(ctx)).toBe('f16');
      const byDefault = inferenceTileMath(ctx) === 'f16' ? out.layers : 0;
      expect(out.f16Attention).toEqual({ f32: 0, f16: out.layers, default: byDefault });
      expect(out.ids.f16).toEqual(out.ids.f32);
      expect(out.ids.default).toEqual(out.ids.f32);
    }
  });
});
