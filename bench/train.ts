/**
 * The `train` suite: LoRA training tokens/s and GPU memory in the browser or under Node (issue 4,
 * item 8), on stories260K and the random SmolLM2-135M-shaped model, through LoraTrainer (frozen
 * weights f16, and for some cases q8_0 and q4_0: QLoRA's smaller base side by side with it).
 *
 * One step = LoraTrainer.submitStep on one B × T batch (fixed pseudo-random ids, labels = ids):
 * upload, forward, chunked loss, backward, gradient norm, clipped AdamW, and the step's report read
 * back while the next step is already queued; timed as the interval between consecutive results
 * after `warmupSteps` untimed steps. tokens/s = B·T / step time.
 *
 * Memory: peak_gpu_bytes = LoraTrainer.memory.total (frozen weights + LoRA parameters, gradients
 * and AdamW moments + saved activations + backward/loss/optimizer scratch: every buffer the
 * trainer allocates up front; nothing is allocated per step). live_bytes_peak = the largest
 * GpuContext.liveBytes seen after creating the trainer and after each step (everything this
 * context holds, read-back staging included), as a check on the former. gpuBytes = the exact peak
 * of live GPU bytes from creating the trainer to the last step (GpuContext.counters.peakLiveBytes,
 * kept by the context at every allocation), the model's weights included.
 *
 * Counts: dispatchesPerStep, submitsPerStep and blockingReadbacksPerStep are the exact differences
 * of GpuContext.counters over the timed loop divided by its steps (they must divide exactly: every
 * step submits the same planned work).
 */
import { diffCounters, type GpuContext, WebtuneError } from '@webtune/core';
import type { CausalLM } from '@webtune/models';
import { LoraTrainer } from '@webtune/train';
import { casesByModel, TRAIN_HYPER, type TrainCase, trainCases, trainIds } from './cases.js';
import { loadBenchModel, medianLow, type SuiteOptions } from './models.js';

async function benchCase(ctx: GpuContext, model: CausalLM, c: TrainCase, loadMs: number, o: SuiteOptions) {
  ctx.resetPeakLiveBytes();
  const trainer = await LoraTrainer.create(ctx, model, {
    lora: { r: c.r, lora_alpha: c.alpha, target_modules: c.targets, lora_dropout: 0 },
    batch: c.batch,
    seq: c.seq,
    optimizer: {
      lr: TRAIN_HYPER.lr,
      weightDecay: TRAIN_HYPER.weightDecay,
      maxGradNorm: TRAIN_HYPER.maxGradNorm,
      beta1: TRAIN_HYPER.beta1,
      beta2: TRAIN_HYPER.beta2,
      eps: TRAIN_HYPER.eps,
    },
    seed: 0,
  });
  try {
    let livePeak = ctx.liveBytes;
    const ids = trainIds(c);
    const batch = [{ inputIds: ids, labels: ids }];
    const losses: number[] = [];
    const warmup: number[] = [];
    for (let i = 0; i < c.warmupSteps; i++) {
      o.status(`${c.key}: warm-up step ${i + 1}`);
      const t0 = performance.now();
      losses.push((await trainer.trainStep(batch)).loss);
      warmup.push(performance.now() - t0);
    }
    // The timed loop is the pipelined one a training run uses: step n + 1 is queued before step
    // n's result is awaited. A step's time is the interval between consecutive results (the
    // first from the loop's start). One more step is queued behind the last timed one so that
    // it, too, is read back with work queued after it; it is drained outside the count.
    const samples: number[] = [];
    const before = ctx.counters;
    const start = performance.now();
    let last = start;
    let pending = trainer.submitStep(batch);
    let submitted = 1;
    for (;;) {
      const more =
        samples.length + 1 < c.maxSteps && (samples.length + 1 < c.minSteps || performance.now() - start < c.budgetMs);
      o.status(`${c.key}: step ${samples.length + 1}`);
      const next = trainer.submitStep(batch);
      submitted++;
      const r = await pending.result;
      const now = performance.now();
      samples.push(now - last);
      last = now;
      losses.push(r.loss);
      livePeak = Math.max(livePeak, ctx.liveBytes);
      pending = next;
      if (!more) break;
    }
    // Exact counts over the loop: `submitted` steps queued, samples.length reports read.
    const spent = diffCounters(before, ctx.counters);
    await pending.result;
    const perStep = (total: number, steps: number, what: string) => {
      if (total % steps !== 0) throw new WebtuneError(`${what}: ${total} over ${steps} steps is not the same per step`);
      return total / steps;
    };
    const ms = medianLow(samples);
    const tokens = c.batch * c.seq;
    const m = trainer.memory;
    const trainableParams = trainer.resolved.modules.reduce(
      (n, mod) => n + mod.aShape[0] * mod.aShape[1] + mod.bShape[0] * mod.bShape[1],
      0,
    );
    const targets = c.targets === 'all-linear' ? 'all-linear' : c.targets.join(',');
    o.report({
      name: 'lora_train_step',
      shape: `${c.model} ${c.precision} r=${c.r} ${targets} B=${c.batch} T=${c.seq}`,
      ms,
      gflops: null,
      baseline: null,
      baselineMs: null,
      ratio: null,
      adapter: o.adapter,
      dispatchesPerStep: perStep(spent.dispatches, submitted, 'dispatches'),
      submitsPerStep: perStep(spent.submits, submitted, 'submits'),
      blockingReadbacksPerStep: perStep(spent.blockingReadbacks, samples.length, 'blocking readbacks'),
      gpuBytes: ctx.counters.peakLiveBytes,
      extra: {
        case: c.key,
        precision: c.precision,
        // The forward projections' tile math (trainingTileMath: f16 on GPUs with shader-f16).
        tile_math: trainer.tileMath,
        tokens_per_s: (tokens * 1000) / ms,
        steps: samples.length,
        min_ms: Math.min(...samples),
        first_step_ms: warmup[0] ?? samples[0] ?? 0,
        first_loss: losses[0] ?? Number.NaN,
        trainable_params: trainableParams,
        peak_gpu_bytes: m.total,
        live_bytes_peak: livePeak,
        frozen_bytes: m.frozenWeights,
        trainable_bytes: m.trainable,
        activation_bytes: m.activations,
        scratch_bytes: m.scratch,
        model_load_ms: loadMs,
      },
    });
  } finally {
    trainer.dispose();
  }
}

export async function runTrainBenchmarks(ctx: GpuContext, o: SuiteOptions): Promise<void> {
  const cases = trainCases(o.quick).filter((c) => !o.only || c.key.includes(o.only));
  const groups = casesByModel(cases).flatMap(([id, ofModel]) =>
    [...new Set(ofModel.map((c) => c.precision))].map(
      (precision) => [id, precision, ofModel.filter((c) => c.precision === precision)] as const,
    ),
  );
  for (const [id, precision, mine] of groups) {
    let loaded: { model: CausalLM; loadMs: number };
    try {
      o.status(`loading ${id} (${precision})`);
      loaded = await loadBenchModel(ctx, id, o, precision);
    } catch (e) {
      for (const c of mine) o.fail(c.key, e);
      continue;
    }
    try {
      for (const c of mine) {
        o.status(c.key);
        try {
          await benchCase(ctx, loaded.model, c, loaded.loadMs, o);
        } catch (e) {
          o.fail(c.key, e);
        }
      }
    } finally {
      loaded.model.dispose();
    }
  }
}
