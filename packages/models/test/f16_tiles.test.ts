// Inference plans asking for f16 tiles (ForwardOptions.tileMath: shaders/tile_f16.wgsl) against
// Hugging Face transformers running the same f16-rounded weights in f32 (tools/golden_forward.py):
// logits and loss of every fixture architecture, beside the same plan with f32 tiles. The f16 case
// runs where the adapter has shader-f16 (the node-lavapipe-f16 project: Mesa 25 lavapipe) and
// skips elsewhere. Its bounds are f16's, not a golden's: measured, the loss is within 2.1e-3 of
// transformers' and the logits within 0.12 (tiny-llama; 0.017 with Qwen3's q/k norms, GPT-2 and
// stories260K), since without q/k norms the tiny models' sharp attention scores amplify the f16
// rounding of q and k. f32 tiles stay within 2e-2 (measured 3e-5).
import { readFloat32, StepEncoder, type TileMath, writeTensor } from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { planForward } from '../src/forward.js';
import { loadModel } from '../src/model.js';
import { causalLmLoss, FIXTURES, fixturePath, forwardGolden, repoSource } from './fixtures.js';

const gpu = useGpu();

describe('inference forward with f16 tiles against transformers (f16 weights)', () => {
  for (const name of FIXTURES) {
    for (const tileMath of ['f32', 'f16'] as const satisfies readonly TileMath[]) {
      it(`${name}, ${tileMath} tiles`, async (t) => {
        const ctx = gpu();
        if (tileMath === 'f16' && !ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
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
          writeTensor(plan.ids, golden.input_ids.flat());
          new StepEncoder(ctx, 'forward')
            .clear(plan.embeddingErrors)
            .dispatch(...plan.dispatches)
            .submit();
          const logits = await readFloat32(plan.logits!);
          plan.dispose();
          model.dispose();
          return { logits, f16Dispatches };
        });
        if (tileMath === 'f16') expect(out.f16Dispatches).toBeGreaterThan(0);
        else expect(out.f16Dispatches).toBe(0);
        const logitsTol = tileMath === 'f16' ? 0.25 : 2e-2;
        expectClose(ctx, `${name} ${tileMath} tiles logits`, out.logits, golden.logits_f16_weights.data, logitsTol, 0);
        const loss = causalLmLoss(out.logits, golden.input_ids, golden.vocab_size);
        expect(Math.abs(loss - golden.loss_f16_weights), `loss ${loss} vs ${golden.loss_f16_weights}`).toBeLessThan(
          tileMath === 'f16' ? 5e-3 : 1e-4,
        );
      });
    }
  }
});
