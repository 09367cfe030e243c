// Every fixture architecture against Hugging Face transformers (tools/golden_forward.py): logits
// on fixed inputs with f32 weights (max |Δ| ≤ 1e-3) and with f16 weights (≤ 2e-2 against
// transformers running the same f16-rounded matrices), the loss, and every layer's hidden state
// for the first sequence (f32).
import { readFloat32, StepEncoder, writeTensor } from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { expectClose, gpuCase, useGpu } from '../../core/test/gpu.js';
import { planForward } from '../src/forward.js';
import { loadModel } from '../src/model.js';
import { causalLmLoss, FIXTURES, fixturePath, forwardGolden, repoSource } from './fixtures.js';

const gpu = useGpu();

describe('forward pass against transformers', () => {
  for (const name of FIXTURES) {
    for (const precision of ['f32', 'f16'] as const) {
      it(`${name} with ${precision} weights`, async () => {
        const ctx = gpu();
        const golden = await forwardGolden(name);
        const source = await repoSource(fixturePath(name));
        const out = await gpuCase(ctx, `${name} ${precision}`, async () => {
          const model = await loadModel(ctx, source, { precision });
          const B = golden.input_ids.length;
          const T = (golden.input_ids[0] as number[]).length;
          // The norm before the gated MLP inside its dispatch with f32 weights (the tightest bound),
          // its own dispatch with f16 ones, whatever the adapter's default (normInMlpPays).
          const normInMlp = precision === 'f32';
          const plan = await planForward(ctx, model, { B, T, logits: true, mode: 'train', normInMlp });
          writeTensor(plan.ids, golden.input_ids.flat());
          new StepEncoder(ctx, 'forward')
            .clear(plan.embeddingErrors)
            .dispatch(...plan.dispatches)
            .submit();
          const logits = await readFloat32(plan.logits!);
          // hidden_states[i] for i < L is layer i's input; [L] is the final norm's output.
          const hidden: Float32Array[] = [];
          for (const l of plan.layers) hidden.push((await readFloat32(l.x)).slice(0, T * model.config.hiddenSize));
          hidden.push((await readFloat32(plan.hidden)).slice(0, T * model.config.hiddenSize));
          plan.dispose();
          model.dispose();
          return { logits, hidden };
        });
        const H = golden.hidden_size;
        const T = (golden.input_ids[0] as number[]).length;
        const f32 = precision === 'f32';
        if (f32) {
          out.hidden.forEach((h, i) => {
            const want = golden.hidden_states.data.slice(i * T * H, (i + 1) * T * H);
            expectClose(ctx, `${name} hidden[${i}]`, h, want, 1e-3, 1e-4);
          });
        }
        const want = f32 ? golden.logits.data : golden.logits_f16_weights.data;
        expectClose(ctx, `${name} ${precision} logits`, out.logits, want, f32 ? 1e-3 : 2e-2, 0);
        const loss = causalLmLoss(out.logits, golden.input_ids, golden.vocab_size);
        const wantLoss = f32 ? golden.loss : golden.loss_f16_weights;
        expect(Math.abs(loss - wantLoss), `loss ${loss} vs ${wantLoss}`).toBeLessThan(1e-4);
      });
    }
  }
});
