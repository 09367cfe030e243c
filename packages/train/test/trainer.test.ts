// Ten AdamW steps with a warmup schedule and gradient clipping reproduce PEFT +
// torch.optim.AdamW (tools/golden_peft_train.py) step by step: the loss before each update, the
// learning rate, the gradient norm, and the final adapter weights; then the adapter exported by
// webtune holds exactly those weights under PEFT's names, and PEFT's own saved adapter imports
// and gives PEFT's loss.
import { diffCounters } from '@webtune/core';
import { loadModel, namedModules, openSafetensors } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { maxRelError } from '../../core/ref/check.js';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { repoSource } from '../../models/test/fixtures.js';
import { readPeftAdapter } from '../src/lora/index.js';
import { LoraTrainer, StepDiscardedError, type StepResult, TrainingDivergedError } from '../src/trainer.js';

const gpu = useGpu();

interface Golden {
  path: string;
  lora: Record<string, unknown> & { r: number; lora_alpha: number; target_modules: unknown; use_rslora: boolean };
  batch: { input_ids: number[][]; labels: number[][] };
  modules: { module: string; key_prefix: string }[];
  train: {
    optimizer: { lr: number; weight_decay: number; eps: number; betas: [number, number] };
    schedule: { num_warmup_steps: number; num_training_steps: number };
    max_grad_norm: number;
    losses: number[];
    lrs: number[];
    grad_norms: number[];
    final_loss: number;
  };
  adapter: { loss: number };
}

const goldens = import.meta.glob<Golden>('./golden/peft-train/*/golden.json', { import: 'default' });

const RUNS = ['tiny-llama-A', 'tiny-qwen2-B', 'tiny-qwen3-A', 'tiny-gpt2-B', 'tiny-llama3-B', 'stories260K-A'];

describe('ten AdamW steps against PEFT + torch', () => {
  for (const run of RUNS) {
    it(run, async () => {
      const ctx = gpu();
      const g = await (goldens[`./golden/peft-train/${run}/golden.json`] as () => Promise<Golden>)();
      const runSource = await repoSource(`packages/train/test/golden/peft-train/${run}`);
      const tensors = await openSafetensors(runSource, 'tensors.safetensors');
      const modelSource = await repoSource(g.path);
      const out = await gpuCase(ctx, run, async () => {
        const model = await loadModel(ctx, modelSource, { precision: 'f32' });
        const initial = new Map<string, { a: Float32Array; b: Float32Array }>();
        for (const m of g.modules) {
          initial.set(m.module, {
            a: await tensors.readTensor(`${m.key_prefix}.lora_A.weight`),
            b: await tensors.readTensor(`${m.key_prefix}.lora_B.weight`),
          });
        }
        const B = g.batch.input_ids.length;
        const T = (g.batch.input_ids[0] as number[]).length;
        const o = g.train.optimizer;
        const trainer = await LoraTrainer.create(ctx, model, {
          lora: {
            r: g.lora.r,
            lora_alpha: g.lora.lora_alpha,
            target_modules: g.lora.target_modules,
            use_rslora: g.lora.use_rslora,
            lora_dropout: 0,
          },
          batch: B,
          seq: T,
          optimizer: {
            lr: o.lr,
            weightDecay: o.weight_decay,
            eps: o.eps,
            beta1: o.betas[0],
            beta2: o.betas[1],
            maxGradNorm: g.train.max_grad_norm,
          },
          schedule: {
            kind: 'linear',
            warmupSteps: g.train.schedule.num_warmup_steps,
            totalSteps: g.train.schedule.num_training_steps,
          },
          initialWeights: initial,
        });
        const steps = [];
        for (let s = 0; s < g.train.losses.length; s++) {
          steps.push(await trainer.trainStep([{ inputIds: g.batch.input_ids.flat(), labels: g.batch.labels.flat() }]));
        }
        const final = await trainer.readWeights();
        const finalLoss = (
          await trainer.evaluate(
            [0, 1].map((b) => ({ inputIds: g.batch.input_ids[b] as number[], labels: g.batch.labels[b] as number[] })),
            2,
          )
        ).loss;
        const exported = await trainer.exportPeft({ baseModelNameOrPath: g.path });
        trainer.dispose();
        model.dispose();
        return { steps, final, finalLoss, exported };
      });
      out.steps.forEach((s, i) => {
        expect(
          Math.abs(s.loss - (g.train.losses[i] as number)) / (g.train.losses[i] as number),
          `loss at step ${i + 1}`,
        ).toBeLessThan(1e-3);
        expect(s.lr).toBeCloseTo(g.train.lrs[i] as number, 12);
        expect(
          Math.abs(s.gradNorm - (g.train.grad_norms[i] as number)) / (g.train.grad_norms[i] as number),
          `grad norm at step ${i + 1}`,
        ).toBeLessThan(1e-3);
      });
      // evaluate() counts per example and averages over all counted tokens, as transformers does.
      expect(Math.abs(out.finalLoss - g.train.final_loss) / g.train.final_loss).toBeLessThan(1e-3);
      let worst = 0;
      for (const m of g.modules) {
        const w = out.final.get(m.module)!;
        for (const [which, got] of [
          ['A', w.a],
          ['B', w.b],
        ] as const) {
          const want = await tensors.readTensor(`final.${m.key_prefix}.lora_${which}.weight`);
          worst = Math.max(worst, maxRelError(got, want));
        }
      }
      expect(worst, 'final weights').toBeLessThan(1e-3);
      expect(out.exported['adapter_config.json']).toContain('"peft_type": "LORA"');
      console.log(
        `${run}: losses ${out.steps[0]?.loss.toFixed(5)} -> ${out.steps.at(-1)?.loss.toFixed(5)} (PEFT ${g.train.losses.at(-1)?.toFixed(5)}), final weights max rel error ${worst.toExponential(2)}`,
      );
    });
  }

  it('imports the adapter PEFT saved and gets PEFT’s loss with it', async () => {
    const ctx = gpu();
    const run = 'tiny-qwen3-B';
    const g = await (goldens[`./golden/peft-train/${run}/golden.json`] as () => Promise<Golden>)();
    const modelSource = await repoSource(g.path);
    const adapterSource = await repoSource(`packages/train/test/golden/peft-train/${run}/adapter`);
    const loss = await gpuCase(ctx, 'import', async () => {
      const model = await loadModel(ctx, modelSource, { precision: 'f32' });
      const imported = await readPeftAdapter(adapterSource, namedModules(model.config), model.config.modelType);
      expect(imported.warnings).toEqual([]);
      const trainer = await LoraTrainer.create(ctx, model, {
        lora: imported.resolved,
        initialWeights: imported.weights,
        batch: 2,
        seq: 12,
        optimizer: { lr: 1e-3 },
      });
      const r = await trainer.evaluate(
        [0, 1].map((b) => ({ inputIds: g.batch.input_ids[b] as number[], labels: g.batch.labels[b] as number[] })),
        2,
      );
      trainer.dispose();
      model.dispose();
      return r.loss;
    });
    expect(Math.abs(loss - g.adapter.loss) / g.adapter.loss).toBeLessThan(1e-4);
  });

  it('lora_dropout: a run restored from readState() at a step draws the same masks', async () => {
    const ctx = gpu();
    const modelSource = await repoSource('apps/studio/public/models/stories260K');
    await gpuCase(ctx, 'dropout', async () => {
      const model = await loadModel(ctx, modelSource, { precision: 'f32' });
      const options = (p: number) => ({
        lora: { r: 4, lora_alpha: 8, lora_dropout: p, target_modules: 'all-linear' },
        batch: 2,
        seq: 8,
        gradAccum: 2,
        optimizer: { lr: 1e-2 },
        seed: 7,
      });
      const batches = Array.from({ length: 5 }, (_, s) =>
        [0, 1].map((k) => {
          const ids = Array.from({ length: 16 }, (_, i) => 1 + ((s * 37 + k * 101 + i * 11) % 500));
          return { inputIds: ids, labels: ids };
        }),
      );
      const whole = await LoraTrainer.create(ctx, model, options(0.3));
      // The plan holds the masked-input scratch and the counters: and the estimate says so.
      expect(whole.estimate.buffers.some((b) => b.label === 'train.lora_dropout')).toBe(true);
      const losses: number[] = [];
      let state: Awaited<ReturnType<LoraTrainer['readState']>> | undefined;
      for (const [s, b] of batches.entries()) {
        losses.push((await whole.trainStep(b)).loss);
        if (s === 2) state = await whole.readState();
      }
      const final = await whole.readWeights();
      whole.dispose();
      const resumed = await LoraTrainer.create(ctx, model, options(0.3));
      resumed.restoreState(state!);
      for (const [s, b] of batches.entries()) {
        if (s < 3) continue;
        expect((await resumed.trainStep(b)).loss, `loss at step ${s + 1}`).toBe(losses[s]);
      }
      const again = await resumed.readWeights();
      resumed.dispose();
      for (const [name, w] of final) {
        expect(again.get(name)?.a, name).toEqual(w.a);
        expect(again.get(name)?.b, name).toEqual(w.b);
      }
      // Without dropout the same run ends elsewhere (the masks act), and plans no dropout buffers.
      const plain = await LoraTrainer.create(ctx, model, options(0));
      expect(plain.estimate.buffers.some((b) => b.label.includes('dropout'))).toBe(false);
      for (const b of batches) await plain.trainStep(b);
      const other = await plain.readWeights();
      plain.dispose();
      const name = [...final.keys()][0] as string;
      expect(other.get(name)?.a).not.toEqual(final.get(name)?.a);
      model.dispose();
    });
  });

  it('stops on a non-finite loss and keeps the last good adapter', async () => {
    const ctx = gpu();
    const modelSource = await repoSource('apps/studio/public/models/stories260K');
    await gpuCase(ctx, 'diverge', async () => {
      const model = await loadModel(ctx, modelSource, { precision: 'f32' });
      const trainer = await LoraTrainer.create(ctx, model, {
        lora: { r: 4, lora_alpha: 8 },
        batch: 1,
        seq: 8,
        optimizer: { lr: 1e30, maxGradNorm: Infinity },
        seed: 3,
      });
      const batch = { inputIds: [1, 20, 30, 40, 50, 60, 70, 80], labels: [1, 20, 30, 40, 50, 60, 70, 80] };
      await trainer.trainStep([batch]);
      const good = await trainer.readWeights();
      let error: unknown;
      for (let i = 0; i < 5 && !error; i++) {
        try {
          await trainer.trainStep([batch]);
        } catch (e) {
          error = e;
        }
      }
      expect(error).toBeInstanceOf(TrainingDivergedError);
      // The diverged step is not counted: the schedule and AdamW's bias correction stay put.
      expect(trainer.step).toBe((error as TrainingDivergedError).step - 1);
      const after = await trainer.readWeights();
      // The failing step changed nothing; what is on the GPU is a finite adapter.
      for (const w of after.values()) for (const x of [...w.a, ...w.b]) expect(Number.isFinite(x)).toBe(true);
      expect(good.size).toBe(after.size);
      trainer.dispose();
      model.dispose();
    });
  });

  it('catches a divergence at most one step late in a pipelined run, with the adapter and moments from before it', async () => {
    const ctx = gpu();
    const modelSource = await repoSource('apps/studio/public/models/stories260K');
    await gpuCase(ctx, 'pipelined divergence', async () => {
      const model = await loadModel(ctx, modelSource, { precision: 'f32' });
      const options = {
        lora: { r: 4, lora_alpha: 8 },
        batch: 1,
        seq: 8,
        optimizer: { lr: 1e30, maxGradNorm: Infinity },
        seed: 3,
      };
      const batch = { inputIds: [1, 20, 30, 40, 50, 60, 70, 80], labels: [1, 20, 30, 40, 50, 60, 70, 80] };
      // A sequential run finds the step that diverges.
      const probe = await LoraTrainer.create(ctx, model, options);
      let diverged = 0;
      for (let i = 0; i < 5 && !diverged; i++) {
        await probe.trainStep([batch]).catch((e) => {
          if (e instanceof TrainingDivergedError) diverged = e.step;
          else throw e;
        });
      }
      probe.dispose();
      expect(diverged).toBeGreaterThan(1);
      // The same run pipelined: the diverged step and two more are queued before any result is read.
      const trainer = await LoraTrainer.create(ctx, model, options);
      for (let i = 1; i < diverged; i++) await trainer.trainStep([batch]);
      const good = await trainer.readState();
      const before = ctx.counters;
      const handles = [0, 1, 2].map(() => trainer.submitStep([batch]));
      expect(handles.map((h) => h.step)).toEqual([diverged, diverged + 1, diverged + 2]);
      expect(trainer.pendingSteps).toBe(3);
      await expect(handles[0]?.result).rejects.toBeInstanceOf(TrainingDivergedError);
      await expect(handles[1]?.result).rejects.toBeInstanceOf(StepDiscardedError);
      await expect(handles[2]?.result).rejects.toThrow(`step ${diverged + 2} was discarded: step ${diverged}`);
      // Three submits, each with its report read back; only the last waited on an idle queue.
      const spent = diffCounters(before, ctx.counters);
      expect([spent.submits, spent.readbacks, spent.blockingReadbacks]).toEqual([3, 3, 1]);
      expect(trainer.step).toBe(diverged - 1);
      expect(trainer.pendingSteps).toBe(0);
      // Bit for bit the state after the last good step: A, B, both moments, the step count.
      expect(await trainer.readState()).toEqual(good);
      // The next step takes the diverged one's number again (and, with this learning rate, diverges).
      const again = trainer.submitStep([batch]);
      expect(again.step).toBe(diverged);
      await expect(again.result).rejects.toBeInstanceOf(TrainingDivergedError);
      trainer.dispose();
      model.dispose();
    });
  });

  it('gives the same run pipelined as step by step, and waits on an idle queue only after the last step', async () => {
    const ctx = gpu();
    const modelSource = await repoSource('apps/studio/public/models/stories260K');
    await gpuCase(ctx, 'pipelined', async () => {
      const model = await loadModel(ctx, modelSource, { precision: 'f32' });
      const options = {
        lora: { r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj', 'down_proj'] },
        batch: 2,
        seq: 8,
        gradAccum: 2,
        optimizer: { lr: 5e-3 },
        schedule: { kind: 'linear' as const, warmupSteps: 2, totalSteps: 6 },
        seed: 7,
      };
      const micro = (s: number) =>
        [0, 1].map((k) => {
          const ids = Array.from({ length: 16 }, (_, i) => 1 + ((s * 53 + k * 29 + i * 13) % 500));
          return { inputIds: ids, labels: ids };
        });
      const sequential = await LoraTrainer.create(ctx, model, options);
      const want: StepResult[] = [];
      for (let s = 0; s < 6; s++) want.push(await sequential.trainStep(micro(s)));
      const wantWeights = await sequential.readWeights();
      sequential.dispose();

      const expectSameRun = async (trainer: LoraTrainer, got: StepResult[]) => {
        for (const [i, r] of got.entries()) {
          const w = want[i] as StepResult;
          expect([r.step, r.loss, r.gradNorm, r.lr, r.tokens]).toEqual([w.step, w.loss, w.gradNorm, w.lr, w.tokens]);
        }
        const weights = await trainer.readWeights();
        for (const [name, w] of wantWeights) {
          expect(weights.get(name)?.a, name).toEqual(w.a);
          expect(weights.get(name)?.b, name).toEqual(w.b);
        }
      };

      // The loop an application writes: submit step n + 1, then await step n. Two steps are in
      // flight each time the host waits. (Whether the queue ran dry meanwhile depends on how fast
      // the host is against the GPU, so this loop's blocking readbacks are not asserted.)
      const pipelined = await LoraTrainer.create(ctx, model, options);
      let before = ctx.counters;
      const got: StepResult[] = [];
      let pending = pipelined.submitStep(micro(0));
      for (let s = 1; s < 6; s++) {
        const next = pipelined.submitStep(micro(s));
        expect(pipelined.pendingSteps).toBe(2);
        got.push(await pending.result);
        pending = next;
      }
      got.push(await pending.result);
      let spent = diffCounters(before, ctx.counters);
      expect([spent.submits, spent.readbacks]).toEqual([6, 6]);
      await expectSameRun(pipelined, got);
      pipelined.dispose();

      // All six queued before any result is read: only the last readback found nothing behind it.
      const queued = await LoraTrainer.create(ctx, model, options);
      before = ctx.counters;
      const handles = [0, 1, 2, 3, 4, 5].map((s) => queued.submitStep(micro(s)));
      expect(queued.pendingSteps).toBe(6);
      const all = await Promise.all(handles.map((h) => h.result));
      spent = diffCounters(before, ctx.counters);
      expect([spent.submits, spent.readbacks, spent.blockingReadbacks]).toEqual([6, 6, 1]);
      await expectSameRun(queued, all);
      queued.dispose();
      model.dispose();
    });
  });

  it('continues a run exactly from readState() in a new trainer (checkpoint and resume)', async () => {
    const ctx = gpu();
    const modelSource = await repoSource('apps/studio/public/models/stories260K');
    await gpuCase(ctx, 'state', async () => {
      const model = await loadModel(ctx, modelSource, { precision: 'f32' });
      const options = {
        lora: { r: 4, lora_alpha: 8, target_modules: 'all-linear' },
        batch: 2,
        seq: 8,
        optimizer: { lr: 5e-3 },
        schedule: { kind: 'cosine' as const, warmupSteps: 2, totalSteps: 8 },
        seed: 5,
      };
      const batches = Array.from({ length: 8 }, (_, s) => {
        const ids = Array.from({ length: 16 }, (_, i) => 1 + ((s * 37 + i * 11) % 500));
        return { inputIds: ids, labels: ids };
      });
      const whole = await LoraTrainer.create(ctx, model, options);
      const losses: number[] = [];
      let state: Awaited<ReturnType<LoraTrainer['readState']>> | undefined;
      for (const [s, b] of batches.entries()) {
        losses.push((await whole.trainStep([b])).loss);
        if (s === 3) state = await whole.readState();
      }
      const final = await whole.readWeights();
      whole.dispose();
      expect(state?.step).toBe(4);
      const resumed = await LoraTrainer.create(ctx, model, { ...options, seed: 99 });
      resumed.restoreState(state!);
      expect(resumed.step).toBe(4);
      for (const [s, b] of batches.entries()) {
        if (s < 4) continue;
        const r = await resumed.trainStep([b]);
        expect(r.step).toBe(s + 1);
        expect(r.loss, `loss at step ${s + 1}`).toBe(losses[s]);
      }
      const again = await resumed.readWeights();
      for (const [name, w] of final) expect(again.get(name)?.a, name).toEqual(w.a);
      expect(() => resumed.restoreState({ ...state!, modules: state!.modules.slice(1) })).toThrow(/modules/);
      resumed.dispose();
      model.dispose();
    });
  });
});
