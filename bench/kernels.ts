/**
 * Kernel benchmarks, run in the browser against baselines measured in the same page:
 * - lora_fwd_bwd_fused vs lora_fwd_bwd_unfused: one LoRA layer's forward + backward, fused
 *   (h kernel, W0 tile loop with the low-rank term, g/dA/dB kernels, fused dx) against the same
 *   math as separate dispatches of our own best matmul plus an add;
 * - matmul vs tfjs_webgpu_matmul: our tiled matmul against TF.js's WebGPU backend on the same
 *   device, for x·Wᵀ (forward) and dy·W (the backward's transposed case);
 * - matmul_f16_tiles vs matmul_f32_tiles: x·Wᵀ with f16 W, staged and multiplied in f16 (f32
 *   accumulation) against the f32 build, on adapters with shader-f16 only.
 */

import { WebGPUBackend } from '@tensorflow/tfjs-backend-webgpu';
import * as tf from '@tensorflow/tfjs-core';
import {
  createTensor,
  type Dispatch,
  type GpuContext,
  type LoraLayer,
  loraFlops,
  planLoraBackward,
  planLoraBackwardUnfused,
  planLoraForward,
  planLoraForwardUnfused,
  planMatmul,
  readFloat32,
  StepEncoder,
  type Tensor,
  tensorFromData,
} from '@webtune/core';
import { timePair } from './measure.js';
import type { BenchOptions } from './record.js';

function random(n: number, seed: number, scale: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 4294967296) * 2 - 1) * scale;
  }
  return out;
}

async function runOnce(ctx: GpuContext, dispatches: Dispatch[], label: string): Promise<void> {
  const enc = new StepEncoder(ctx, label);
  enc.dispatch(...dispatches).submit();
  await enc.done();
}

const gflops = (flops: number, ms: number) => flops / ms / 1e6;

/** Real model shapes: T tokens through a d×d projection (q_proj/o_proj-like) with rank r. */
function loraShapes(quick: boolean): { T: number; d: number; r: number }[] {
  if (quick) return [{ T: 128, d: 256, r: 8 }];
  const out: { T: number; d: number; r: number }[] = [];
  for (const d of [576, 960, 2048]) for (const r of [8, 16, 64]) out.push({ T: 512, d, r });
  return out;
}

async function benchLora(ctx: GpuContext, o: BenchOptions): Promise<void> {
  for (const { T, d, r } of loraShapes(o.quick)) {
    for (const w0Dtype of ['f32', 'f16'] as const) {
      const shape = `T=${T} in=${d} out=${d} r=${r} W0:${w0Dtype}`;
      o.status(`lora ${shape}`);
      const layer: LoraLayer = {
        w0: tensorFromData(ctx, random(d * d, 1, 0.05), [d, d], w0Dtype, 'w0'),
        a: tensorFromData(ctx, random(r * d, 2, 0.05), [r, d], 'f32', 'lora_A'),
        b: tensorFromData(ctx, random(d * r, 3, 0.05), [d, r], 'f32', 'lora_B'),
        scale: 2,
      };
      const x = tensorFromData(ctx, random(T * d, 4, 1), [T, d], 'f32', 'x');
      const dy = tensorFromData(ctx, random(T * d, 5, 1), [T, d], 'f32', 'dy');
      const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const io = {
        x,
        dy,
        y: t([T, d], 'y'),
        h: t([T, r], 'h'),
        g: t([T, r], 'g'),
        dx: t([T, d], 'dx'),
        da: t([r, d], 'dA'),
        db: t([d, r], 'dB'),
      };
      const fused = [...(await planLoraForward(ctx, layer, io)), ...(await planLoraBackward(ctx, layer, io))];
      const uf = await planLoraForwardUnfused(ctx, layer, io);
      const ub = await planLoraBackwardUnfused(ctx, layer, io);
      const unfused = [...uf.dispatches, ...ub.dispatches];
      const flops = loraFlops({ T, inF: d, outF: d, r });
      const total = flops.forward + flops.backward;
      const budgetMs = o.quick ? 2000 : 20_000;
      const timing = await timePair(
        () => runOnce(ctx, fused, 'fused'),
        () => runOnce(ctx, unfused, 'unfused'),
        { budgetMs },
      );
      const mine = timing.mine;
      const baseMs = timing.baseline.medianMs;
      o.report({
        name: w0Dtype === 'f32' ? 'lora_fwd_bwd_fused' : 'lora_fwd_bwd_fused_w16',
        shape,
        ms: mine.medianMs,
        gflops: gflops(total, mine.medianMs),
        baseline: w0Dtype === 'f32' ? 'lora_fwd_bwd_unfused' : 'lora_fwd_bwd_unfused_w16',
        baselineMs: baseMs,
        ratio: baseMs / mine.medianMs,
        adapter: o.adapter,
        extra: {
          dispatches_fused: fused.length,
          dispatches_unfused: unfused.length,
          baseline_gflops: gflops(total, baseMs),
          samples: mine.samples,
        },
      });
      for (const dsp of fused) dsp.dispose();
      uf.dispose();
      ub.dispose();
      for (const tensor of [layer.w0, layer.a, layer.b, ...Object.values(io)]) tensor.dispose();
    }
  }
}

function matmulShapes(quick: boolean): { M: number; N: number; K: number; transW: boolean }[] {
  if (quick)
    return [
      { M: 128, N: 256, K: 256, transW: true },
      { M: 128, N: 256, K: 256, transW: false },
    ];
  const out: { M: number; N: number; K: number; transW: boolean }[] = [];
  for (const d of [576, 960, 2048]) for (const transW of [true, false]) out.push({ M: 512, N: d, K: d, transW });
  // A thin one (x·Aᵀ with r = 16) where generic tiles are weakest.
  out.push({ M: 512, N: 16, K: 576, transW: true });
  return out;
}

async function benchMatmul(ctx: GpuContext, o: BenchOptions): Promise<void> {
  // TF.js on the very same device, so both run on the same adapter and queue. Its kernels are
  // registered under the name 'webgpu', so our instance replaces the factory of that name.
  if (tf.findBackendFactory('webgpu')) tf.removeBackend('webgpu');
  tf.registerBackend('webgpu', () => new WebGPUBackend(ctx.device));
  await tf.setBackend('webgpu');
  await tf.ready();
  const backend = tf.backend() as WebGPUBackend;
  for (const { M, N, K, transW } of matmulShapes(o.quick)) {
    const shape = `${M}x${N}x${K} ${transW ? 'x·Wᵀ' : 'dy·W'}`;
    o.status(`matmul ${shape}`);
    const aData = random(M * K, 7, 1);
    const wData = random(N * K, 8, 0.05);
    const wShape = transW ? [N, K] : [K, N];
    const a: Tensor = tensorFromData(ctx, aData, [M, K], 'f32', 'a');
    const w: Tensor = tensorFromData(ctx, wData, wShape, 'f32', 'w');
    const c: Tensor = createTensor(ctx, [M, N], 'f32', 'c');
    const mm = await planMatmul(ctx, a, w, c, { transW });
    const ta = tf.tensor2d(aData, [M, K]);
    const tw = tf.tensor2d(wData, wShape as [number, number]);
    const runTf = async () => {
      const out = tf.matMul(ta, tw, false, transW);
      // TF.js leaves its compute pass open until something reads; close it before submitting,
      // or the command buffer is invalid and nothing runs.
      backend.endComputePassEncoder();
      backend.submitQueue();
      await ctx.device.queue.onSubmittedWorkDone();
      out.dispose();
    };
    // Prove the baseline does its work: no WebGPU error, and the same product as ours.
    ctx.device.pushErrorScope('validation');
    const check = tf.matMul(ta, tw, false, transW);
    const tfOut = (await check.data()) as Float32Array;
    check.dispose();
    const tfError = await ctx.device.popErrorScope();
    if (tfError) throw new Error(`TF.js matmul raised a WebGPU error: ${tfError.message}`);
    await runOnce(ctx, [mm], 'matmul check');
    const ours = await readFloat32(c);
    let maxDiff = 0;
    for (let i = 0; i < ours.length; i++)
      maxDiff = Math.max(maxDiff, Math.abs((ours[i] as number) - (tfOut[i] as number)));
    if (!(maxDiff < 1e-2)) throw new Error(`TF.js and webtune disagree on ${shape}: max |diff| ${maxDiff}`);
    const budgetMs = o.quick ? 2000 : 20_000;
    const { mine, baseline: base } = await timePair(() => runOnce(ctx, [mm], 'matmul'), runTf, { budgetMs });
    const flops = 2 * M * N * K;
    o.report({
      name: 'matmul',
      shape,
      ms: mine.medianMs,
      gflops: gflops(flops, mine.medianMs),
      baseline: 'tfjs_webgpu_matmul',
      baselineMs: base.medianMs,
      ratio: base.medianMs / mine.medianMs,
      adapter: o.adapter,
      extra: { baseline_gflops: gflops(flops, base.medianMs), samples: mine.samples },
    });
    mm.dispose();
    for (const tensor of [a, w, c]) tensor.dispose();
    ta.dispose();
    tw.dispose();
  }
  tf.removeBackend('webgpu');
}

async function benchF16Tiles(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!ctx.features.shaderF16) {
    o.status('matmul_f16_tiles: skipped, the adapter has no shader-f16');
    return;
  }
  for (const { M, N, K } of matmulShapes(o.quick).filter((m) => m.transW)) {
    const shape = `${M}x${N}x${K} x·Wᵀ W:f16`;
    o.status(`matmul_f16_tiles ${shape}`);
    const a = tensorFromData(ctx, random(M * K, 7, 1), [M, K], 'f32', 'a');
    const w = tensorFromData(ctx, random(N * K, 8, 0.05), [N, K], 'f16', 'w');
    const c16 = createTensor(ctx, [M, N], 'f32', 'c16');
    const c32 = createTensor(ctx, [M, N], 'f32', 'c32');
    const f16 = await planMatmul(ctx, a, w, c16, { tileMath: 'f16' });
    const f32 = await planMatmul(ctx, a, w, c32, { tileMath: 'f32' });
    // Both builds compute the same product: f16 rounding only.
    await runOnce(ctx, [f16, f32], 'f16 tiles check');
    const [x16, x32] = [await readFloat32(c16), await readFloat32(c32)];
    let maxDiff = 0;
    for (let i = 0; i < x16.length; i++) maxDiff = Math.max(maxDiff, Math.abs((x16[i] as number) - (x32[i] as number)));
    if (!(maxDiff < 1e-2 * Math.sqrt(K)))
      throw new Error(`f16 and f32 tiles disagree on ${shape}: max |diff| ${maxDiff}`);
    const budgetMs = o.quick ? 2000 : 20_000;
    const { mine, baseline: base } = await timePair(
      () => runOnce(ctx, [f16], 'f16 tiles'),
      () => runOnce(ctx, [f32], 'f32 tiles'),
      { budgetMs },
    );
    const flops = 2 * M * N * K;
    o.report({
      name: 'matmul_f16_tiles',
      shape,
      ms: mine.medianMs,
      gflops: gflops(flops, mine.medianMs),
      baseline: 'matmul_f32_tiles',
      baselineMs: base.medianMs,
      ratio: base.medianMs / mine.medianMs,
      adapter: o.adapter,
      extra: { baseline_gflops: gflops(flops, base.medianMs), max_abs_diff: maxDiff, samples: mine.samples },
    });
    for (const x of [f16, f32]) x.dispose();
    for (const x of [a, w, c16, c32]) x.dispose();
  }
}

export async function runKernelBenchmarks(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!o.only || 'matmul'.includes(o.only)) await benchMatmul(ctx, o);
  if (!o.only || 'matmul_f16_tiles'.includes(o.only)) await benchF16Tiles(ctx, o);
  if (!o.only || 'lora_fwd_bwd'.includes(o.only)) await benchLora(ctx, o);
}
