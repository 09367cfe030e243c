/**
 * The `models` suite: prefill and decode tokens/s of whole models in the browser or under Node
 * (issue 3, item 10), through the engine's own Generator, on stories260K and the random
 * SmolLM2-135M-shaped model (bench/bench_model.ts). Frozen weights are uploaded as f16, the
 * product's default.
 *
 * - prefill: Generator.generate(prompt, 1 new token): its prefillSeconds, i.e. planning the
 *   prompt's pass, the forward pass writing the KV cache, and reading the last position's logits.
 * - decode: Generator.generate(prompt, N new tokens, greedy, no stop token): decodeSeconds per
 *   step (N - 1 one-token steps, each a submit and a read-back of one row of logits).
 *   dispatchesPerToken is the exact number of compute dispatches one decode step submitted
 *   (GpuContext.counters around the steps, GenerateResult.decodeCounters); gpuBytes the peak of
 *   live GPU bytes while the case ran (weights, KV cache and plans).
 *
 * Records carry extra.case (bench/cases.ts's key); bench/run.ts fills in the PyTorch baseline
 * measured on the same machine for the same case (tools/bench_torch.py).
 */
import { type GpuContext, inferenceTileMath, WebtuneError } from '@webtune/core';
import { type CausalLM, Generator, loadModel, type ModelSource } from '@webtune/models';
import {
  BENCH_MODELS,
  type BenchModelId,
  type BenchPrecision,
  benchTokenIds,
  casesByModel,
  decodeStepFlops,
  type InferenceCase,
  inferenceCases,
  inferenceShape,
  inferenceTokensPerSecond,
  prefillFlops,
  promptIds,
} from './cases.js';
import type { BenchOptions } from './record.js';

export interface SuiteOptions extends BenchOptions {
  /** A case that cannot run is reported here and the suite goes on with the next one. */
  fail: (key: string, error: unknown) => void;
  /** Where a bench model's files are read from (the page: its server; Node: the folder). */
  source: (id: BenchModelId) => ModelSource;
}

/** Lower median: with two samples, the faster one. */
export function medianLow(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)] as number;
}

/** Every sample's milliseconds in a record's extra (comma-separated, 0.01 ms): the driver's
 * rank-sum test of webtune against transformers.js reads them (rankSumP). */
export function samplesField(samples: readonly number[]): string {
  return samples.map((ms) => ms.toFixed(2)).join(',');
}

/** Calls `run` (which returns its own milliseconds) minSamples times, more while the budget
 * lasts, at most maxSamples. */
export async function sample(
  run: () => Promise<number>,
  o: { minSamples: number; maxSamples: number; budgetMs: number },
): Promise<number[]> {
  const out: number[] = [];
  const start = performance.now();
  while (out.length < o.maxSamples && (out.length < o.minSamples || performance.now() - start < o.budgetMs)) {
    out.push(await run());
  }
  return out;
}

/** Loads a bench model from the suite's source. */
export async function loadBenchModel(
  ctx: GpuContext,
  id: BenchModelId,
  o: Pick<SuiteOptions, 'source' | 'status'>,
  precision: BenchPrecision = 'f16',
): Promise<{ model: CausalLM; loadMs: number }> {
  const t0 = performance.now();
  let last = 0;
  const model = await loadModel(ctx, o.source(id), {
    precision,
    onProgress: (p) => {
      if (p.total > 0 && p.loaded - last > p.total / 4) {
        last = p.loaded;
        o.status(`loading ${id}: ${Math.round((100 * p.loaded) / p.total)}%`);
      }
    },
  });
  return { model, loadMs: performance.now() - t0 };
}

async function benchModel(
  ctx: GpuContext,
  id: BenchModelId,
  cases: readonly InferenceCase[],
  o: SuiteOptions,
): Promise<void> {
  const spec = BENCH_MODELS[id];
  o.status(`loading ${id}`);
  const { model, loadMs } = await loadBenchModel(ctx, id, o);
  let generator: Generator | undefined;
  try {
    const maxSequence = Math.min(spec.maxPositions, Math.max(...cases.map((c) => c.prompt + c.newTokens)));
    // The product's default (inferenceTileMath: f16 tiles on GPUs with shader-f16, f32 on CPU
    // adapters), beside transformers.js's fp16 peer (the weights are f16 here); the records say which.
    const tileMath = inferenceTileMath(ctx);
    generator = await Generator.create(ctx, model, { maxSequence, tileMath });
    const gen = generator;
    // A short prefill compiles its pipelines before anything is timed (the decode step's were
    // compiled when the generator planned it).
    o.status(`${id}: warm-up`);
    await gen.generate(benchTokenIds(8, spec.vocab, 7), { maxNewTokens: 1, temperature: 0, stopTokens: [] });
    for (const c of cases) {
      o.status(c.key);
      try {
        const prompt = promptIds(c);
        if (c.kind === 'prefill') {
          const samples = await sample(async () => {
            const r = await gen.generate(prompt, { maxNewTokens: 1, temperature: 0, stopTokens: [] });
            return r.prefillSeconds * 1000;
          }, c);
          const ms = medianLow(samples);
          o.report({
            name: 'prefill',
            shape: inferenceShape(c),
            ms,
            gflops: prefillFlops(spec, c.prompt) / ms / 1e6,
            baseline: null,
            baselineMs: null,
            ratio: null,
            adapter: o.adapter,
            extra: {
              case: c.key,
              tokens_per_s: inferenceTokensPerSecond(c, ms),
              samples: samples.length,
              min_ms: Math.min(...samples),
              samples_ms: samplesField(samples),
              tile_math: gen.tileMath,
              model_load_ms: loadMs,
              weights_bytes: model.bytes,
            },
          });
        } else {
          let ids: number[] = [];
          const perToken = new Set<number>();
          ctx.resetPeakLiveBytes();
          const samples = await sample(async () => {
            const r = await gen.generate(prompt, { maxNewTokens: c.newTokens, temperature: 0, stopTokens: [] });
            if (r.ids.length !== c.newTokens)
              throw new WebtuneError(`decode made ${r.ids.length} tokens, ${c.newTokens} asked (${r.stopReason})`);
            ids = r.ids;
            perToken.add(r.decodeCounters.dispatches / r.decodeSteps);
            return (r.decodeSeconds * 1000) / (c.newTokens - 1);
          }, c);
          // Every decode step records the same planned dispatches; more than one value is a bug.
          if (perToken.size !== 1) throw new WebtuneError(`decode dispatches per token varied: ${[...perToken]}`);
          const ms = medianLow(samples);
          let flops = 0;
          for (let pos = c.prompt; pos < c.prompt + c.newTokens - 1; pos++) flops += decodeStepFlops(spec, pos);
          flops /= c.newTokens - 1;
          o.report({
            name: 'decode',
            shape: inferenceShape(c),
            ms,
            gflops: flops / ms / 1e6,
            baseline: null,
            baselineMs: null,
            ratio: null,
            adapter: o.adapter,
            dispatchesPerToken: [...perToken][0] as number,
            gpuBytes: ctx.counters.peakLiveBytes,
            extra: {
              case: c.key,
              tokens_per_s: inferenceTokensPerSecond(c, ms),
              samples: samples.length,
              min_ms: Math.min(...samples),
              samples_ms: samplesField(samples),
              tile_math: gen.tileMath,
              kv_cache_bytes: gen.cacheBytes,
              // Compared with PyTorch's greedy ids by the driver, then dropped.
              ids: ids.join(','),
            },
          });
        }
      } catch (e) {
        o.fail(c.key, e);
      }
    }
  } finally {
    generator?.dispose();
    model.dispose();
  }
}

export async function runModelBenchmarks(ctx: GpuContext, o: SuiteOptions): Promise<void> {
  const cases = inferenceCases(o.quick, o.samples).filter((c) => !o.only || c.key.includes(o.only));
  for (const [id, mine] of casesByModel(cases)) {
    try {
      await benchModel(ctx, id, mine, o);
    } catch (e) {
      for (const c of mine) o.fail(c.key, e);
    }
  }
}
