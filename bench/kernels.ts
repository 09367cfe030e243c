/**
 * Kernel benchmarks, run in the browser (or under Node, bench/node.ts) against baselines measured
 * in the same page and on the same device:
 * - lora_fwd_bwd_fused vs lora_fwd_bwd_unfused: one LoRA layer's forward + backward, fused
 *   (h kernel, W0 tile loop with the low-rank term, g/dA/dB kernels, fused dx) against the same
 *   math as separate dispatches of our own best matmul plus an add;
 * - matmul vs tfjs_webgpu_matmul: our tiled matmul against TF.js's WebGPU backend on the same
 *   device, for x·Wᵀ (forward) and dy·W (the backward's transposed case);
 * - matmul_direct vs matmul_staged: the tiled matmul reading straight from the buffers against
 *   staging through workgroup memory (GpuContext.matmulStaging's choice), on the same shapes;
 * - matmul_f16_tiles vs matmul_f32_tiles: x·Wᵀ with f16 W (alone and with a LoRA term, which
 *   stays f32), staged and multiplied in f16 (f32 accumulation) against the f32 build, and
 *   attention_f16_tiles vs attention_f32_tiles, the tiled attention forward likewise; on adapters
 *   with shader-f16 only.
 * - matmul_rope vs matmul_then_rope: the q projection (x·Wᵀ with its LoRA term) stored through
 *   the RoPE epilogue against the same product followed by the RoPE dispatch it replaces;
 * - glu_norm vs rmsnorm_then_glu: the gated MLP's gate and up projections on RMSNorm(x), the norm
 *   inside the dispatch (matmul_glu_norm), against the norm dispatch followed by matmul_glu;
 * - matmul_resid vs matmul_accumulate: the down projection adding the residual from a buffer of its
 *   own (what training plans when the norm before the MLP copied nothing) against accumulating
 *   into C that already holds it (beta = 1), the store it replaces;
 * - lora_h_in_matmul vs lora_h_then_matmul: an adapted projection (the o projection, r = 8 and
 *   16) forming LoRA's h from its own staged tiles (matmul_lora_h) against the h dispatch the
 *   forward plans before it (loraThinKernel's) followed by the matmul with the low-rank term;
 * - norm_bwd_in_dx vs norm_bwd_then_dx: the o projection's dx (∂L/∂mid·W_o) with the backward of
 *   the RMSNorm before the MLP formed as its A tiles are staged (matmul_norm_bwd) against that norm's
 *   backward dispatch (accumulating into ∂L/∂out) followed by the plain dx matmul;
 * - attention_bwd_one vs attention_bwd_two: the tiled attention backward (the GPUs' plan) with dq,
 *   dk and dv in one dispatch (attention_bwd) against dq with delta then dk and dv;
 * - norm1_in_down_dx vs norm1_then_down_dx: the MLP backward of the layer below one whose input
 *   norm's backward runs in the down projection's dx prologue (matmul_norm_bwd, then gate and up's
 *   dx through silu·mul's backward in their prologue, matmul_glu_bwd) against that norm's dispatch,
 *   the down dx with the nonlinearity's backward in its store, and matmul_sum;
 * - loss_dz_in_dh vs loss_dz_apart: the loss in training with dz formed inside each chunk's dH
 *   matmul (matmul_dlogits) against a dlogits dispatch before each;
 * - qkv_fwd_one vs qkv_fwd_two: a layer's q, k and v (q and v adapted, RoPE on q and k) in one
 *   dispatch (matmul_qkv) against q through the RoPE epilogue, then v beside k (matmul_pair_rope);
 * - qkv_dx_one vs qkv_dx_two: the dx of a layer's q, k and v with q's and v's LoRA terms in one
 *   dispatch (matmul_sum_lr) against the two the plan made before (q and k with q's LoRA term, then
 *   v with its own, accumulating); and with all three adapted, three LoRA terms in one against q
 *   and k with two, then v; and gate_up_dx_one vs gate_up_dx_two, both adapted (all-linear);
 * - rmsnorm_lora_h vs rmsnorm_then_lora_rows: the RMSNorm that also computes two or three
 *   projections' LoRA h (rmsnorm_fwd_lora) against the norm followed by lora_rows_multi;
 * - lora_g_db_pair vs two_lora_g_db: g and dB of two projections in one dispatch against one
 *   lora_g_db each (the trainer plans the pair on GPUs only);
 * - lora_g_db_many vs pair_and_lora_g_db: g and dB of q, k and v (all adapted) in one dispatch
 *   against lora_g_db_pair for q and k and lora_g_db for v (GPUs plan both only);
 * - lora_da_many vs lora_da_per_layer: the dA of every adapted projection of a SmolLM2-135M step
 *   (q and v of 30 layers) in one dispatch, as training plans them now, against one lora_cols_multi
 *   per layer, as it did before;
 * - subgroup_reductions vs workgroup_trees: the reducing kernels (RMSNorm over rows, the split-K
 *   matvec of a decode step, the loss's vocabulary chunks, the LoRA h = x·Aᵀ) built with subgroup operations against
 *   the same kernels with workgroup-memory trees, each on a device of its own from the same
 *   adapter, both with the GPU kernel configurations (the CPU ones reduce little); on adapters
 *   with subgroups only.
 * - dispatch_cost (only with `--only dispatch_cost`): what one small matmul dispatch costs beside
 *   its work, against the same pipeline from pruned WGSL and naive products with one of its traits.
 */

import { WebGPUBackend } from '@tensorflow/tfjs-backend-webgpu';
import * as tf from '@tensorflow/tfjs-core';
import {
  attentionFlops,
  attentionShapes,
  createGpuContext,
  createTensor,
  type Dispatch,
  type GpuContext,
  type LoraGradModule,
  type LoraLayer,
  loraFlops,
  matmulFlops,
  planAttentionBackward,
  planAttentionForward,
  planCrossEntropyForward,
  planCrossEntropyTraining,
  planLoraBackward,
  planLoraBackwardUnfused,
  planLoraColsMulti,
  planLoraDaMany,
  planLoraForward,
  planLoraForwardUnfused,
  planLoraGradGdB,
  planLoraGradGdBMany,
  planLoraGradGdBPair,
  planLoraRows,
  planLoraRowsMulti,
  planMatmul,
  planQkvMatmul,
  planRmsNormBackward,
  planRmsNormForward,
  planRopeForward,
  readFloat32,
  StepEncoder,
  type Tensor,
  TensorArena,
  tensorFromData,
  type Workgroups,
  writeTensor,
} from '@webtune/core';
import { type RatioSpread, timePair } from './measure.js';
import type { BenchOptions } from './record.js';
import { pruneWgsl } from './wgsl_prune.js';

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

/** `--shape`: whether a kernel case of this shape label runs. */
const wanted = (o: BenchOptions, shape: string) => !o.shape || shape.includes(o.shape);

/** timePair's rounds: `--samples N` asks for N whatever they take; otherwise 7 within a budget. */
function rounds(o: BenchOptions): { iters?: number; budgetMs: number } {
  if (o.samples !== undefined) return { iters: o.samples, budgetMs: Number.POSITIVE_INFINITY };
  return { budgetMs: o.quick ? 2000 : 20_000 };
}

/** A ratio's spread over its rounds, for the record's extra (see RatioSpread). */
function spreadExtra(s: RatioSpread): Record<string, number> {
  return {
    samples: s.rounds,
    ratio_paired_median: s.median,
    ratio_q1: s.q1,
    ratio_q3: s.q3,
    ratio_ties: s.ties,
    ratio_sign_p: s.signP,
  };
}

/** max |a[i] − b[i]|: how far two builds (or ours and a baseline) are apart before they are timed. */
/** RoPE's inv_freq for heads of `hd` (base 10000), as a tensor. */
function ropeInvFreq(ctx: GpuContext, hd: number): Tensor {
  return tensorFromData(
    ctx,
    Float32Array.from({ length: hd / 2 }, (_, i) => 10000 ** (-(2 * i) / hd)),
    [hd / 2],
    'f32',
    'inv_freq',
  );
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs((a[i] as number) - (b[i] as number)));
  return max;
}

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
      if (!wanted(o, shape)) continue;
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
      const timing = await timePair(
        () => runOnce(ctx, fused, 'fused'),
        () => runOnce(ctx, unfused, 'unfused'),
        rounds(o),
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
          ...spreadExtra(timing.spread),
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
    if (!wanted(o, shape)) continue;
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
    const maxDiff = maxAbsDiff(ours, tfOut);
    if (!(maxDiff < 1e-2)) throw new Error(`TF.js and webtune disagree on ${shape}: max |diff| ${maxDiff}`);
    const { mine, baseline: base, spread } = await timePair(() => runOnce(ctx, [mm], 'matmul'), runTf, rounds(o));
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
      extra: { baseline_gflops: gflops(flops, base.medianMs), ...spreadExtra(spread) },
    });
    mm.dispose();
    for (const tensor of [a, w, c]) tensor.dispose();
    ta.dispose();
    tw.dispose();
  }
  tf.removeBackend('webgpu');
}

/** One build against the other on the same work: both run once and their outputs are compared
 * within `tol`, then timed against each other. The caller disposes of the plans and tensors. */
async function timeTileMath(
  ctx: GpuContext,
  o: BenchOptions,
  c: {
    name: string;
    shape: string;
    f16: Dispatch[];
    f32: Dispatch[];
    outputs: [Tensor, Tensor][];
    tol: number;
    flops: number;
  },
): Promise<void> {
  // The groups that do not test --shape before planning: it skips their runs, not their plans.
  if (!wanted(o, c.shape)) return;
  o.status(`${c.name} ${c.shape}`);
  // Both builds compute the same thing: f16 rounding only.
  await runOnce(ctx, [...c.f16, ...c.f32], `${c.name} check`);
  let maxDiff = 0;
  for (const [a, b] of c.outputs) maxDiff = Math.max(maxDiff, maxAbsDiff(await readFloat32(a), await readFloat32(b)));
  if (!(maxDiff < c.tol)) throw new Error(`${c.name}: f16 and f32 tiles disagree on ${c.shape}: max |diff| ${maxDiff}`);
  const { mine, baseline, spread } = await timePair(
    () => runOnce(ctx, c.f16, `${c.name} f16`),
    () => runOnce(ctx, c.f32, `${c.name} f32`),
    rounds(o),
  );
  o.report({
    name: c.name,
    shape: c.shape,
    ms: mine.medianMs,
    gflops: gflops(c.flops, mine.medianMs),
    baseline: c.name.replace('f16', 'f32'),
    baselineMs: baseline.medianMs,
    ratio: baseline.medianMs / mine.medianMs,
    adapter: o.adapter,
    extra: { baseline_gflops: gflops(c.flops, baseline.medianMs), max_abs_diff: maxDiff, ...spreadExtra(spread) },
  });
}

/**
 * The tiled matmul reading its operands straight from the buffers (DIRECT) against staging them
 * through workgroup memory, on the matmul shapes: the choice GpuContext.matmulStaging measures
 * (ratio above 1: direct is faster, which the adapter's probe should then have chosen).
 */
async function benchMatmulDirect(ctx: GpuContext, o: BenchOptions): Promise<void> {
  for (const { M, N, K, transW } of matmulShapes(o.quick)) {
    const shape = `${M}x${N}x${K} ${transW ? 'x·Wᵀ' : 'dy·W'} (adapter: ${ctx.matmulStaging})`;
    if (!wanted(o, shape)) continue;
    const a = tensorFromData(ctx, random(M * K, 7, 1), [M, K], 'f32', 'a');
    const w = tensorFromData(ctx, random(N * K, 8, 0.05), transW ? [N, K] : [K, N], 'f32', 'w');
    const cd = createTensor(ctx, [M, N], 'f32', 'c direct');
    const cs = createTensor(ctx, [M, N], 'f32', 'c staged');
    const direct = await planMatmul(ctx, a, w, cd, { transW, staging: 'direct' });
    const staged = await planMatmul(ctx, a, w, cs, { transW, staging: 'workgroup' });
    await timeFusion(ctx, o, {
      name: 'matmul_direct',
      baseline: 'matmul_staged',
      shape,
      fused: [direct],
      plain: [staged],
      outputs: [[cd, cs]],
      flops: 2 * M * N * K,
    });
    for (const x of [direct, staged]) x.dispose();
    for (const x of [a, w, cd, cs]) x.dispose();
  }
}

/** x·Wᵀ with f16 W, alone and as an adapted projection (its LoRA term in f32 beside the f16 tiles). */
async function benchF16Tiles(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!ctx.features.shaderF16) {
    o.status('matmul_f16_tiles: skipped, the adapter has no shader-f16');
    return;
  }
  const r = 8;
  for (const { M, N, K } of matmulShapes(o.quick).filter((m) => m.transW)) {
    for (const lora of N > 16 ? [false, true] : [false]) {
      const shape = `${M}x${N}x${K} x·Wᵀ W:f16${lora ? ` +rank ${r}` : ''}`;
      if (!wanted(o, shape)) continue;
      const a = tensorFromData(ctx, random(M * K, 7, 1), [M, K], 'f32', 'a');
      const w = tensorFromData(ctx, random(N * K, 8, 0.05), [N, K], 'f16', 'w');
      const h = tensorFromData(ctx, random(M * r, 9, 1), [M, r], 'f32', 'h');
      const b = tensorFromData(ctx, random(N * r, 10, 0.01), [N, r], 'f32', 'b');
      const c16 = createTensor(ctx, [M, N], 'f32', 'c16');
      const c32 = createTensor(ctx, [M, N], 'f32', 'c32');
      const lowRank = lora ? { lowRank: { a2: h, b2: b, alpha2: 2 } } : {};
      const f16 = await planMatmul(ctx, a, w, c16, { tileMath: 'f16', ...lowRank });
      const f32 = await planMatmul(ctx, a, w, c32, { tileMath: 'f32', ...lowRank });
      await timeTileMath(ctx, o, {
        name: 'matmul_f16_tiles',
        shape,
        f16: [f16],
        f32: [f32],
        outputs: [[c16, c32]],
        tol: 1e-2 * Math.sqrt(K),
        flops: matmulFlops({ M, N, K }, lora ? r : 0),
      });
      for (const x of [f16, f32]) x.dispose();
      for (const x of [a, w, h, b, c16, c32]) x.dispose();
    }
  }
  // The backward's dy·W (dx's layout, W stored K×N) under a loss scale (lossScaled): dy holds
  // scaled gradients, staged in f16 as the trainer's f16 backward stages them.
  for (const { M, N, K } of matmulShapes(o.quick).filter((m) => !m.transW)) {
    const shape = `${M}x${N}x${K} dy·W W:f16, loss-scaled`;
    if (!wanted(o, shape)) continue;
    const dy = tensorFromData(ctx, random(M * K, 11, 1), [M, K], 'f32', 'dy');
    const w = tensorFromData(ctx, random(K * N, 12, 0.05), [K, N], 'f16', 'w');
    const c16 = createTensor(ctx, [M, N], 'f32', 'dx16');
    const c32 = createTensor(ctx, [M, N], 'f32', 'dx32');
    const f16 = await planMatmul(ctx, dy, w, c16, { transW: false, tileMath: 'f16', lossScaled: true });
    const f32 = await planMatmul(ctx, dy, w, c32, { transW: false });
    await timeTileMath(ctx, o, {
      name: 'matmul_f16_tiles',
      shape,
      f16: [f16],
      f32: [f32],
      outputs: [[c16, c32]],
      tol: 1e-2 * Math.sqrt(K),
      flops: matmulFlops({ M, N, K }, 0),
    });
    for (const x of [f16, f32]) x.dispose();
    for (const x of [dy, w, c16, c32]) x.dispose();
  }
}

/** The tiled attention forward of SmolLM2-135M (9 query heads on 3 kv heads of 64) at 4×128 (and of
 * Qwen2.5-0.5B's heads of 64, 14 on 2), with f16 tiles (which fit blocks of twice the rows) against
 * f32 ones. */
async function benchAttentionF16(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!ctx.features.shaderF16) {
    o.status('attention_f16_tiles: skipped, the adapter has no shader-f16');
    return;
  }
  const T = o.quick ? 32 : 128;
  for (const [nH, nKV] of [
    [9, 3],
    [14, 2],
  ] as const) {
    const shape = `B4 T${T} heads ${nH}/${nKV} of 64`;
    if (!wanted(o, shape)) continue;
    const dims = { B: 4, Tq: T, Tk: T, pos0: 0, nH, nKV, hd: 64 };
    const s = attentionShapes(dims);
    const q = tensorFromData(ctx, random(4 * T * nH * 64, 41, 1.7), s.o, 'f32', 'q');
    const k = tensorFromData(ctx, random(4 * T * nKV * 64, 42, 1.7), s.dk, 'f32', 'k');
    const v = tensorFromData(ctx, random(4 * T * nKV * 64, 43, 1), s.dk, 'f32', 'v');
    const out = (label: string) => [
      createTensor(ctx, s.o, 'f32', `o ${label}`),
      createTensor(ctx, s.lse, 'f32', `lse ${label}`),
    ];
    const [o16, lse16] = out('f16') as [Tensor, Tensor];
    const [o32, lse32] = out('f32') as [Tensor, Tensor];
    const plan = (out: Tensor, lse: Tensor, tileMath: 'f16' | 'f32') =>
      planAttentionForward(ctx, { q, k, v, o: out, lse, dims, variant: 'tiled', tileMath });
    const f16 = await plan(o16, lse16, 'f16');
    const f32 = await plan(o32, lse32, 'f32');
    // QKᵀ and P·V over the visible (causal) half of the scores.
    const flops = 2 * 2 * 4 * nH * ((T * (T + 1)) / 2) * 64;
    await timeTileMath(ctx, o, {
      name: 'attention_f16_tiles',
      shape,
      f16,
      f32,
      outputs: [
        [o16, o32],
        [lse16, lse32],
      ],
      tol: 1e-2,
      flops,
    });
    for (const x of [...f16, ...f32]) x.dispose();
    for (const x of [q, k, v, o16, lse16, o32, lse32]) x.dispose();
  }
}

/** The attention backward of SmolLM2-135M (9 query heads on 3 kv heads of 64, RoPE's backward
 * inside) at 4×128 after an f16 forward, in one dispatch as the trainer runs it: its f16 build
 * under a loss scale (gradTileMath 'f16': dout, a scaled gradient, staged in f16) against its f32
 * build. */
async function benchAttentionBwdF16(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!ctx.features.shaderF16) {
    o.status('attention_bwd_f16_tiles: skipped, the adapter has no shader-f16');
    return;
  }
  const T = o.quick ? 32 : 128;
  const [nH, nKV, hd] = [9, 3, 64];
  const dims = { B: 4, Tq: T, Tk: T, pos0: 0, nH, nKV, hd };
  const s = attentionShapes(dims);
  const data = (shape: readonly number[], seed: number, scale: number, label: string) =>
    tensorFromData(ctx, random((shape[0] as number) * (shape[1] as number), seed, scale), shape, 'f32', label);
  const q = data(s.o, 151, 1.7, 'q');
  const k = data(s.dk, 152, 1.7, 'k');
  const v = data(s.dk, 153, 1, 'v');
  const dout = data(s.o, 154, 1, 'dout');
  const out = createTensor(ctx, s.o, 'f32', 'o');
  const lse = createTensor(ctx, s.lse, 'f32', 'lse');
  const fwd = await planAttentionForward(ctx, { q, k, v, o: out, lse, dims, variant: 'tiled', tileMath: 'f16' });
  await runOnce(ctx, fwd, 'attention forward (f16)');
  const arena = (label: string) =>
    new TensorArena(
      ctx,
      [
        { shape: [...s.o], label: 'dq' },
        { shape: [...s.dk], label: 'dk' },
        { shape: [...s.dk], label: 'dv' },
      ],
      label,
    );
  const [g16, g32] = [arena('attention grads f16'), arena('attention grads f32')];
  const invFreq = Float32Array.from({ length: hd / 2 }, (_, i) => 10000 ** (-(2 * i) / hd));
  const io = {
    ...{ q, k, v, o: out, lse, do: dout, dims },
    variant: 'tiled' as const,
    tileMath: 'f16' as const,
    rope: { invFreq, scaling: 1 },
  };
  const grads = (g: TensorArena) => {
    const [dq, dk, dv] = g.views as [Tensor, Tensor, Tensor];
    return { dq, dk, dv };
  };
  const f16 = await planAttentionBackward(ctx, { ...io, ...grads(g16), gradTileMath: 'f16' });
  const f32 = await planAttentionBackward(ctx, { ...io, ...grads(g32), gradTileMath: 'f32' });
  await timeTileMath(ctx, o, {
    name: 'attention_bwd_f16_tiles',
    shape: `B4 T${T} heads ${nH}/${nKV} of ${hd}, RoPE, loss-scaled dout`,
    f16,
    f32,
    outputs: [
      [g16.views[0] as Tensor, g32.views[0] as Tensor],
      [g16.views[1] as Tensor, g32.views[1] as Tensor],
      [g16.views[2] as Tensor, g32.views[2] as Tensor],
    ],
    tol: 1e-2,
    flops: attentionFlops(dims).backward,
  });
  for (const x of [...fwd, ...f16, ...f32]) x.dispose();
  for (const x of [q, k, v, dout, out, lse, g16, g32]) x.dispose();
}

/** The attention backward of SmolLM2-135M (9 query heads on 3 kv heads of 64, RoPE's backward
 * inside) at 4×128 on the tiled kernels (the GPUs' plan): dq, dk and dv in one dispatch, places of
 * one buffer as the trainer keeps them (attention_bwd), against dq with delta then dk and dv. */
async function benchAttentionBwd(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const [nH, nKV, hd] = [9, 3, 64];
  const dims = { B: 4, Tq: T, Tk: T, pos0: 0, nH, nKV, hd };
  const s = attentionShapes(dims);
  const data = (shape: readonly number[], seed: number, scale: number, label: string) =>
    tensorFromData(ctx, random((shape[0] as number) * (shape[1] as number), seed, scale), shape, 'f32', label);
  const q = data(s.o, 141, 1.7, 'q');
  const k = data(s.dk, 142, 1.7, 'k');
  const v = data(s.dk, 143, 1, 'v');
  const dout = data(s.o, 144, 1, 'dout');
  const out = createTensor(ctx, s.o, 'f32', 'o');
  const lse = createTensor(ctx, s.lse, 'f32', 'lse');
  const fwd = await planAttentionForward(ctx, { q, k, v, o: out, lse, dims, variant: 'tiled' });
  await runOnce(ctx, fwd, 'attention forward');
  const grads = new TensorArena(
    ctx,
    [
      { shape: [...s.o], label: 'dq' },
      { shape: [...s.dk], label: 'dk' },
      { shape: [...s.dk], label: 'dv' },
    ],
    'attention grads',
  );
  const [dq1, dk1, dv1] = grads.views as [Tensor, Tensor, Tensor];
  const [dq2, dk2, dv2] = [
    createTensor(ctx, s.o, 'f32', 'dq two'),
    createTensor(ctx, s.dk, 'f32', 'dk two'),
    createTensor(ctx, s.dk, 'f32', 'dv two'),
  ];
  const delta = createTensor(ctx, s.delta, 'f32', 'delta');
  const invFreq = Float32Array.from({ length: hd / 2 }, (_, i) => 10000 ** (-(2 * i) / hd));
  const io = { q, k, v, o: out, lse, do: dout, dims, variant: 'tiled' as const, rope: { invFreq, scaling: 1 } };
  const fused = await planAttentionBackward(ctx, { ...io, dq: dq1, dk: dk1, dv: dv1 });
  const plain = await planAttentionBackward(ctx, { ...io, dq: dq2, dk: dk2, dv: dv2, delta });
  await timeFusion(ctx, o, {
    name: 'attention_bwd_one',
    baseline: 'attention_bwd_two',
    shape: `B4 T${T} heads ${nH}/${nKV} of ${hd}, RoPE`,
    fused,
    plain,
    outputs: [
      [dq1, dq2],
      [dk1, dk2],
      [dv1, dv2],
    ],
    flops: attentionFlops(dims).backward,
  });
  for (const x of [...fwd, ...fused, ...plain]) x.dispose();
  for (const x of [q, k, v, dout, out, lse, dq2, dk2, dv2, delta, grads]) x.dispose();
}

/** The q projection of SmolLM2-135M (9 heads of 64) at 4×128 rows with r = 8, rotated in its store
 * or by the RoPE dispatch after it. */
async function benchMatmulRope(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const [d, hd, r] = [576, 64, 8];
  const shape = `${M}x${d}x${d} +rank ${r}, heads of ${hd}, W:f16`;
  const x = tensorFromData(ctx, random(M * d, 31, 1), [M, d], 'f32', 'x');
  const w = tensorFromData(ctx, random(d * d, 32, 0.05), [d, d], 'f16', 'w');
  const h = tensorFromData(ctx, random(M * r, 33, 1), [M, r], 'f32', 'h');
  const b = tensorFromData(ctx, random(d * r, 34, 0.05), [d, r], 'f32', 'b');
  const invFreq = ropeInvFreq(ctx, hd);
  const fusedOut = createTensor(ctx, [M, d], 'f32', 'q fused');
  const plainOut = createTensor(ctx, [M, d], 'f32', 'q plain');
  const lowRank = { a2: h, b2: b, alpha2: 2 };
  const fused = await planMatmul(ctx, x, w, fusedOut, {
    lowRank,
    rope: { invFreq, headDim: hd, T, c: true, second: false },
  });
  const plain = [
    await planMatmul(ctx, x, w, plainOut, { lowRank }),
    await planRopeForward(ctx, plainOut, invFreq, { nHeads: d / hd, headDim: hd, T }),
  ];
  await timeFusion(ctx, o, {
    name: 'matmul_rope',
    baseline: 'matmul_then_rope',
    shape,
    fused: [fused],
    plain,
    outputs: [[fusedOut, plainOut]],
    flops: matmulFlops({ M, N: d, K: d }, r),
  });
  for (const t of [fused, ...plain]) t.dispose();
  for (const t of [x, w, h, b, invFreq, fusedOut, plainOut]) t.dispose();
}

async function benchGluNorm(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const [d, I] = [576, 1536]; // SmolLM2-135M's hidden and MLP sizes
  const shape = `${M}x${I}x${d}, gate and up, W:f16`;
  const x = tensorFromData(ctx, random(M * d, 41, 1), [M, d], 'f32', 'x');
  const g = tensorFromData(ctx, random(d, 42, 1), [d], 'f32', 'norm.w');
  const wg = tensorFromData(ctx, random(I * d, 43, 0.05), [I, d], 'f16', 'w_gate');
  const wu = tensorFromData(ctx, random(I * d, 44, 0.05), [I, d], 'f16', 'w_up');
  const n = createTensor(ctx, [M, d], 'f32', 'n');
  const [rstdF, rstdP] = ['rstd fused', 'rstd plain'].map((l) => createTensor(ctx, [M], 'f32', l)) as [Tensor, Tensor];
  const outs = ['gate', 'up', 'act'].map((l) => [
    createTensor(ctx, [M, I], 'f32', `${l} fused`),
    createTensor(ctx, [M, I], 'f32', `${l} plain`),
  ]) as [Tensor, Tensor][];
  const [gate, up, act] = outs as [[Tensor, Tensor], [Tensor, Tensor], [Tensor, Tensor]];
  const fused = await planMatmul(ctx, x, wg, gate[0], {
    glu: { w: wu, up: up[0], act: act[0] },
    norm: { w: g, rstd: rstdF, eps: 1e-5 },
  });
  const plain = [
    await planRmsNormForward(ctx, { x, w: g, y: n, rstd: rstdP }, { eps: 1e-5 }),
    await planMatmul(ctx, n, wg, gate[1], { glu: { w: wu, up: up[1], act: act[1] } }),
  ];
  await timeFusion(ctx, o, {
    name: 'glu_norm',
    baseline: 'rmsnorm_then_glu',
    shape,
    fused: [fused],
    plain,
    outputs: [...outs, [rstdF, rstdP]],
    flops: 2 * matmulFlops({ M, N: I, K: d }),
  });
  for (const t of [fused, ...plain]) t.dispose();
  for (const t of [x, g, wg, wu, n, rstdF, rstdP, ...outs.flat()]) t.dispose();
}

async function benchMatmulResid(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const [d, I] = [576, 1536]; // SmolLM2-135M's down projection: I in, d out
  const shape = `${M}x${d}x${I}, W:f16`;
  const act = tensorFromData(ctx, random(M * I, 51, 1), [M, I], 'f32', 'act');
  const w = tensorFromData(ctx, random(d * I, 52, 0.05), [d, I], 'f16', 'w_down');
  const res = random(M * d, 53, 1);
  const residual = tensorFromData(ctx, res, [M, d], 'f32', 'mid');
  const fusedOut = createTensor(ctx, [M, d], 'f32', 'out resid');
  // The baseline's C starts as the residual; later timed runs keep adding to it (only the first
  // run's output is compared).
  const plainOut = tensorFromData(ctx, res, [M, d], 'f32', 'out accumulate');
  const fused = await planMatmul(ctx, act, w, fusedOut, { residual });
  const plain = await planMatmul(ctx, act, w, plainOut, { beta: 1 });
  await timeFusion(ctx, o, {
    name: 'matmul_resid',
    baseline: 'matmul_accumulate',
    shape,
    fused: [fused],
    plain: [plain],
    outputs: [[fusedOut, plainOut]],
    flops: matmulFlops({ M, N: d, K: I }),
  });
  for (const t of [fused, plain]) t.dispose();
  for (const t of [act, w, residual, fusedOut, plainOut]) t.dispose();
}

/**
 * A fused plan against the plain one it replaces: both plans run once and their outputs (pairs of fused and
 * plain tensors) are compared, then timed against each other and reported with their dispatch
 * counts. The caller disposes of the plans and tensors.
 */
async function timeFusion(
  ctx: GpuContext,
  o: BenchOptions,
  c: {
    name: string;
    baseline: string;
    shape: string;
    fused: Dispatch[];
    plain: Dispatch[];
    outputs: [Tensor, Tensor][];
    /** Floating-point operations of one run, where GFLOP/s mean something. */
    flops?: number;
  },
): Promise<void> {
  // The groups that do not test --shape before planning: it skips their runs, not their plans.
  if (!wanted(o, c.shape)) return;
  o.status(`${c.name} ${c.shape}`);
  await runOnce(ctx, c.fused, c.name);
  await runOnce(ctx, c.plain, c.baseline);
  let maxDiff = 0;
  for (const [f, p] of c.outputs) maxDiff = Math.max(maxDiff, maxAbsDiff(await readFloat32(f), await readFloat32(p)));
  if (!(maxDiff < 1e-4)) throw new Error(`${c.name} and ${c.baseline} disagree on ${c.shape}: max |diff| ${maxDiff}`);
  const { mine, baseline, spread } = await timePair(
    () => runOnce(ctx, c.fused, c.name),
    () => runOnce(ctx, c.plain, c.baseline),
    rounds(o),
  );
  o.report({
    name: c.name,
    shape: c.shape,
    ms: mine.medianMs,
    gflops: c.flops === undefined ? null : gflops(c.flops, mine.medianMs),
    baseline: c.baseline,
    baselineMs: baseline.medianMs,
    ratio: baseline.medianMs / mine.medianMs,
    adapter: o.adapter,
    extra: {
      dispatches: c.fused.length,
      baseline_dispatches: c.plain.length,
      max_abs_diff: maxDiff,
      ...spreadExtra(spread),
    },
  });
}

/** matmul_lora_h: SmolLM2-135M's o projection adapted (r 8 and 16), its h formed in the dispatch,
 * against the h dispatch the forward plans without it followed by the matmul with the low-rank term. */
async function benchLoraHInMatmul(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const d = 576; // SmolLM2-135M's o projection
  for (const r of [8, 16]) {
    const shape = `${M}x${d}x${d}, W:f16, r=${r}`;
    if (!wanted(o, shape)) continue;
    const layer: LoraLayer = {
      w0: tensorFromData(ctx, random(d * d, 61, 0.05), [d, d], 'f16', 'w_o'),
      a: tensorFromData(ctx, random(r * d, 62, 0.05), [r, d], 'f32', 'lora_a'),
      b: tensorFromData(ctx, random(d * r, 63, 0.05), [d, r], 'f32', 'lora_b'),
      scale: 2,
    };
    const x = tensorFromData(ctx, random(M * d, 64, 1), [M, d], 'f32', 'attn');
    const y = [createTensor(ctx, [M, d], 'f32', 'y in'), createTensor(ctx, [M, d], 'f32', 'y then')];
    const h = [createTensor(ctx, [M, r], 'f32', 'h in'), createTensor(ctx, [M, r], 'f32', 'h then')];
    const fused = await planMatmul(ctx, x, layer.w0, y[0] as Tensor, {
      lowRank: { a2: h[0] as Tensor, b2: layer.b, alpha2: layer.scale, a2From: layer.a },
    });
    const plain = await planLoraForward(ctx, layer, { x, y: y[1] as Tensor, h: h[1] as Tensor });
    await timeFusion(ctx, o, {
      name: 'lora_h_in_matmul',
      baseline: 'lora_h_then_matmul',
      shape,
      fused: [fused],
      plain,
      outputs: [
        [y[0] as Tensor, y[1] as Tensor],
        [h[0] as Tensor, h[1] as Tensor],
      ],
      flops: matmulFlops({ M, N: d, K: d }, r) + 2 * M * r * d,
    });
    for (const t of [fused, ...plain]) t.dispose();
    for (const t of [layer.w0, layer.a, layer.b, x, ...y, ...h]) t.dispose();
  }
}

/** matmul_norm_bwd: a SmolLM2-135M layer's o projection dx (o unadapted) with the backward of the
 * norm before the MLP in its prologue, against that norm's backward dispatch, which adds into
 * ∂L/∂out in place, followed by the plain dx matmul. */
async function benchNormBwdInDx(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const d = 576; // SmolLM2-135M's hidden size: o is d×d
  const shape = `${M}x${d}x${d}, W:f16`;
  const mid = random(M * d, 71, 1);
  const rstd = new Float32Array(M);
  for (let i = 0; i < M; i++) {
    let ss = 0;
    for (let j = 0; j < d; j++) ss += (mid[i * d + j] as number) ** 2;
    rstd[i] = 1 / Math.sqrt(ss / d + 1e-5);
  }
  const dOut = random(M * d, 72, 1);
  const x = tensorFromData(ctx, mid, [M, d], 'f32', 'mid');
  const gain = tensorFromData(ctx, random(d, 73, 1), [d], 'f32', 'norm2.w');
  const rstdT = tensorFromData(ctx, rstd, [M], 'f32', 'rstd');
  const dn = tensorFromData(ctx, random(M * d, 74, 1), [M, d], 'f32', 'd_norm_out');
  const w = tensorFromData(ctx, random(d * d, 75, 0.05), [d, d], 'f16', 'w_o');
  const dOutFused = tensorFromData(ctx, dOut, [M, d], 'f32', 'd_out fused');
  // The baseline adds the norm's backward into ∂L/∂out in place; later timed runs keep adding to
  // it (only the first run's outputs are compared).
  const dMidPlain = tensorFromData(ctx, dOut, [M, d], 'f32', 'd_mid plain');
  const dMidFused = createTensor(ctx, [M, d], 'f32', 'd_mid fused');
  const dx = [createTensor(ctx, [M, d], 'f32', 'dx fused'), createTensor(ctx, [M, d], 'f32', 'dx plain')];
  const fused = await planMatmul(ctx, dOutFused, w, dx[0] as Tensor, {
    transW: false,
    normBackward: { dn, x, w: gain, rstd: rstdT, dMid: dMidFused },
  });
  const plain = [
    await planRmsNormBackward(ctx, { x, w: gain, rstd: rstdT, dy: dn, dx: dMidPlain }, { eps: 1e-5, accumulate: true }),
    await planMatmul(ctx, dMidPlain, w, dx[1] as Tensor, { transW: false }),
  ];
  await timeFusion(ctx, o, {
    name: 'norm_bwd_in_dx',
    baseline: 'norm_bwd_then_dx',
    shape,
    fused: [fused],
    plain,
    outputs: [
      [dx[0] as Tensor, dx[1] as Tensor],
      [dMidFused, dMidPlain],
    ],
    flops: matmulFlops({ M, N: d, K: d }),
  });
  for (const t of [fused, ...plain]) t.dispose();
  for (const t of [x, gain, rstdT, dn, w, dOutFused, dMidPlain, dMidFused, ...dx]) t.dispose();
}

/** The MLP backward of a layer below one whose input norm's backward rides in it (SmolLM2-135M, 512
 * rows, hidden 576, intermediate 1536, f16 W): the down projection's dx with that norm's backward
 * in its prologue (matmul_norm_bwd, storing ∂L/∂act) then gate and up's dx forming silu·mul's
 * backward as they stage (matmul_glu_bwd), against the norm's backward dispatch, the down dx with
 * the nonlinearity's backward in its store, and matmul_sum. */
async function benchNorm1InDownDx(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const [d, I] = [576, 1536];
  const shape = `${M}x${d}, I=${I}, W:f16`;
  const xIn = random(M * d, 151, 1);
  const rstd = new Float32Array(M);
  for (let i = 0; i < M; i++) {
    let ss = 0;
    for (let j = 0; j < d; j++) ss += (xIn[i * d + j] as number) ** 2;
    rstd[i] = 1 / Math.sqrt(ss / d + 1e-5);
  }
  const dMidAbove = random(M * d, 152, 1);
  const x = tensorFromData(ctx, xIn, [M, d], 'f32', 'x');
  const gain = tensorFromData(ctx, random(d, 153, 1), [d], 'f32', 'norm1.w');
  const rstdT = tensorFromData(ctx, rstd, [M], 'f32', 'rstd');
  const dn = tensorFromData(ctx, random(M * d, 154, 1), [M, d], 'f32', 'd_n1');
  const gate = tensorFromData(ctx, random(M * I, 155, 2), [M, I], 'f32', 'gate');
  const up = tensorFromData(ctx, random(M * I, 156, 1), [M, I], 'f32', 'up');
  const wDown = tensorFromData(ctx, random(d * I, 157, 0.05), [d, I], 'f16', 'w_down');
  const wGate = tensorFromData(ctx, random(I * d, 158, 0.05), [I, d], 'f16', 'w_gate');
  const wUp = tensorFromData(ctx, random(I * d, 159, 0.05), [I, d], 'f16', 'w_up');
  const dMidFusedIn = tensorFromData(ctx, dMidAbove, [M, d], 'f32', 'd_mid fused');
  // The baseline adds the norm's backward into ∂L/∂mid in place; later timed runs keep adding to
  // it (only the first run's outputs are compared).
  const dResidPlain = tensorFromData(ctx, dMidAbove, [M, d], 'f32', 'd_resid plain');
  const dResidFused = createTensor(ctx, [M, d], 'f32', 'd_resid fused');
  const dAct = createTensor(ctx, [M, I], 'f32', 'd_act');
  const dGate = createTensor(ctx, [M, I], 'f32', 'd_gate');
  const dUp = createTensor(ctx, [M, I], 'f32', 'd_up');
  const dx = [createTensor(ctx, [M, d], 'f32', 'd_n2 fused'), createTensor(ctx, [M, d], 'f32', 'd_n2 plain')];
  const fused = [
    await planMatmul(ctx, dMidFusedIn, wDown, dAct, {
      transW: false,
      normBackward: { dn, x, w: gain, rstd: rstdT, dMid: dResidFused },
    }),
    await planMatmul(ctx, dAct, wGate, dx[0] as Tensor, { transW: false, gluBackward: { gate, up, w3: wUp } }),
  ];
  const plain = [
    await planRmsNormBackward(
      ctx,
      { x, w: gain, rstd: rstdT, dy: dn, dx: dResidPlain },
      { eps: 1e-5, accumulate: true },
    ),
    await planMatmul(ctx, dResidPlain, wDown, dGate, {
      transW: false,
      activationBackward: { kind: 'silu_mul', gate, up, dup: dUp },
    }),
    await planMatmul(ctx, dGate, wGate, dx[1] as Tensor, { transW: false, extra: { a: dUp, w: wUp } }),
  ];
  await timeFusion(ctx, o, {
    name: 'norm1_in_down_dx',
    baseline: 'norm1_then_down_dx',
    shape,
    fused,
    plain,
    outputs: [
      [dx[0] as Tensor, dx[1] as Tensor],
      [dResidFused, dResidPlain],
    ],
    flops: 3 * matmulFlops({ M, N: I, K: d }),
  });
  for (const t of [...fused, ...plain]) t.dispose();
  for (const t of [
    x,
    gain,
    rstdT,
    dn,
    gate,
    up,
    wDown,
    wGate,
    wUp,
    dMidFusedIn,
    dResidPlain,
    dResidFused,
    dAct,
    dGate,
    dUp,
    ...dx,
  ])
    t.dispose();
}

/** The loss in training (forward and ∂L/∂H) over a vocabulary of 8192 in two chunks of 4096, 512
 * rows of 576, f16 LM head: dz formed inside each chunk's dH matmul as it stages the logits
 * (matmul_dlogits) against a dispatch that rewrites the logits with dz before each. */
async function benchLossDz(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const rows = o.quick ? 128 : 512;
  const [vocab, d, chunk] = [8192, 576, 4096];
  const h = tensorFromData(ctx, random(rows * d, 161, 1), [rows, d], 'f32', 'h');
  const e = tensorFromData(ctx, random(vocab * d, 162, 0.05), [vocab, d], 'f16', 'lm_head');
  const labels = tensorFromData(
    ctx,
    Int32Array.from({ length: rows }, (_, i) => (i % 7 === 3 ? -100 : (i * 997) % vocab)),
    [rows],
    'i32',
    'labels',
  );
  const io = (tag: string) => ({
    h,
    e,
    labels,
    lse: createTensor(ctx, [rows], 'f32', `lse ${tag}`),
    loss: createTensor(ctx, [4], 'f32', `loss ${tag}`),
    errors: createTensor(ctx, [2], 'u32', `errors ${tag}`),
    dh: createTensor(ctx, [rows, d], 'f32', `dh ${tag}`),
  });
  const [a, b] = [io('in dH'), io('apart')];
  const fused = await planCrossEntropyTraining(ctx, a, { chunk, dzInMatmul: true });
  const plain = await planCrossEntropyTraining(ctx, b, { chunk, dzInMatmul: false });
  await timeFusion(ctx, o, {
    name: 'loss_dz_in_dh',
    baseline: 'loss_dz_apart',
    shape: `${rows} rows, V=${vocab} in chunks of ${chunk}, d=${d}, E:f16`,
    fused: [...fused.dispatches],
    plain: [...plain.dispatches],
    outputs: [
      [a.dh, b.dh],
      [a.loss, b.loss],
    ],
    // LM-head products: every chunk forward and into dH, and all but the last chunk again.
    flops: 2 * rows * d * (2 * vocab + (vocab - chunk)),
  });
  fused.dispose();
  plain.dispose();
  for (const x of [a, b]) for (const t of [x.lse, x.loss, x.errors, x.dh]) t.dispose();
  for (const t of [h, e, labels]) t.dispose();
}

/** An arena of places of one shape (as the backward's scratch and the LoRA parameters are), each
 * filled with its own random values (seeds seed, seed + 1, ...). */
function filledArena(ctx: GpuContext, label: string, places: readonly string[], shape: number[], seed: number) {
  const arena = new TensorArena(
    ctx,
    places.map((place) => ({ shape, label: place })),
    label,
  );
  for (const [i, v] of arena.views.entries()) writeTensor(v, random(v.size, seed + i, 0.5));
  return arena;
}

/** matmul_sum_lr: the dx of a SmolLM2-135M layer's q, k and v (q and v adapted, r = 8) in one
 * dispatch, dk and dv places of one buffer, g and LoRA's A of q and v in arenas, as training plans
 * them, against matmul_sum (q and k with q's LoRA term) followed by v's LoRA dx accumulating. */
async function benchQkvDx(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const M = o.quick ? 128 : 512;
  const [d, kv, r] = [576, 192, 8]; // SmolLM2-135M: 9 heads of 64, 3 key/value heads
  const shape = `${M}x${d}, K=${d}+${kv}+${kv}, r=${r}+${r}, W:f16`;
  const dq = tensorFromData(ctx, random(M * d, 81, 1), [M, d], 'f32', 'dq');
  const dkv = filledArena(ctx, 'dk dv', ['dk', 'dv'], [M, kv], 82);
  const g = filledArena(ctx, 'g', ['g_q', 'g_v'], [M, r], 84);
  const loraA = filledArena(ctx, 'lora A', ['A_q', 'A_v'], [r, d], 86);
  const w = (rows: number, seed: number, label: string) =>
    tensorFromData(ctx, random(rows * d, seed, 0.05), [rows, d], 'f16', label);
  const [wq, wk, wv] = [w(d, 88, 'w_q'), w(kv, 89, 'w_k'), w(kv, 90, 'w_v')];
  const [dk, dv] = dkv.views as [Tensor, Tensor];
  const [gq, gv] = g.views as [Tensor, Tensor];
  const [aq, av] = loraA.views as [Tensor, Tensor];
  const dx = [createTensor(ctx, [M, d], 'f32', 'dx one'), createTensor(ctx, [M, d], 'f32', 'dx two')];
  const fused = await planMatmul(ctx, dq, wq, dx[0] as Tensor, {
    transW: false,
    lowRank: { a2: gq, b2: aq, alpha2: 2, second: { a2: gv, b2: av, alpha2: 2 } },
    extra: { a: dk, w: wk, third: { a: dv, w: wv } },
  });
  const plain = [
    await planMatmul(ctx, dq, wq, dx[1] as Tensor, {
      transW: false,
      lowRank: { a2: gq, b2: aq, alpha2: 2 },
      extra: { a: dk, w: wk },
    }),
    await planMatmul(ctx, dv, wv, dx[1] as Tensor, { transW: false, beta: 1, lowRank: { a2: gv, b2: av, alpha2: 2 } }),
  ];
  await timeFusion(ctx, o, {
    name: 'qkv_dx_one',
    baseline: 'qkv_dx_two',
    shape,
    fused: [fused],
    plain,
    outputs: [[dx[0] as Tensor, dx[1] as Tensor]],
    flops: matmulFlops({ M, N: d, K: d + 2 * kv }, 2 * r),
  });
  // All three adapted (all-linear): the three LoRA terms in one dispatch against q and k with two,
  // then v with its own, what the plan made before.
  const g3 = filledArena(ctx, 'g3', ['g_q', 'g_k', 'g_v'], [M, r], 91);
  const a3 = filledArena(ctx, 'lora A3', ['A_q', 'A_k', 'A_v'], [r, d], 94);
  const [g3q, g3k, g3v] = g3.views as [Tensor, Tensor, Tensor];
  const [a3q, a3k, a3v] = a3.views as [Tensor, Tensor, Tensor];
  const dx3 = [createTensor(ctx, [M, d], 'f32', 'dx three'), createTensor(ctx, [M, d], 'f32', 'dx two of three')];
  const fused3 = await planMatmul(ctx, dq, wq, dx3[0] as Tensor, {
    transW: false,
    lowRank: {
      a2: g3q,
      b2: a3q,
      alpha2: 2,
      second: { a2: g3k, b2: a3k, alpha2: 2 },
      third: { a2: g3v, b2: a3v, alpha2: 2 },
    },
    extra: { a: dk, w: wk, third: { a: dv, w: wv } },
  });
  const plain3 = [
    await planMatmul(ctx, dq, wq, dx3[1] as Tensor, {
      transW: false,
      lowRank: { a2: g3q, b2: a3q, alpha2: 2, second: { a2: g3k, b2: a3k, alpha2: 2 } },
      extra: { a: dk, w: wk },
    }),
    await planMatmul(ctx, dv, wv, dx3[1] as Tensor, {
      transW: false,
      beta: 1,
      lowRank: { a2: g3v, b2: a3v, alpha2: 2 },
    }),
  ];
  await timeFusion(ctx, o, {
    name: 'qkv_dx_one',
    baseline: 'qkv_dx_two',
    shape: `${M}x${d}, K=${d}+${kv}+${kv}, r=${r}+${r}+${r}, W:f16`,
    fused: [fused3],
    plain: plain3,
    outputs: [[dx3[0] as Tensor, dx3[1] as Tensor]],
    flops: matmulFlops({ M, N: d, K: d + 2 * kv }, 3 * r),
  });
  for (const t of [fused, ...plain, fused3, ...plain3]) t.dispose();
  for (const t of [dq, wq, wk, wv, ...dx, ...dx3]) t.dispose();
  for (const a of [dkv, g, loraA, g3, a3]) a.dispose();
}

/** matmul_qkv: a SmolLM2-135M layer's q, k and v (q and v adapted, r = 8, RoPE on q and k) in one
 * dispatch, as training plans them on GPUs (q, k and v places of one buffer, the h and B of q and v
 * in arenas), against the two it plans otherwise: q with its LoRA term through the RoPE epilogue,
 * then v with its LoRA term beside k, rotated (matmul_pair_rope). */
async function benchQkvForward(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const T = o.quick ? 32 : 128;
  const M = 4 * T;
  const [d, kv, hd, r] = [576, 192, 64, 8]; // SmolLM2-135M: 9 heads of 64, 3 key/value heads
  const shape = `${M}x(${d}+${kv}+${kv})x${d}, r=${r}+${r}, heads of ${hd}, W:f16`;
  const x = tensorFromData(ctx, random(M * d, 121, 1), [M, d], 'f32', 'x');
  const w = (rows: number, seed: number, label: string) =>
    tensorFromData(ctx, random(rows * d, seed, 0.05), [rows, d], 'f16', label);
  const [wq, wk, wv] = [w(d, 122, 'w_q'), w(kv, 123, 'w_k'), w(kv, 124, 'w_v')];
  const h = filledArena(ctx, 'h', ['h_q', 'h_v'], [M, r], 125);
  const bq = new TensorArena(
    ctx,
    [
      { shape: [d, r], label: 'B_q' },
      { shape: [kv, r], label: 'B_v' },
    ],
    'lora B',
  );
  for (const [i, v] of bq.views.entries()) writeTensor(v, random(v.size, 127 + i, 0.5));
  const outs = (label: string) =>
    new TensorArena(
      ctx,
      [
        { shape: [M, d], label: `q ${label}` },
        { shape: [M, kv], label: `k ${label}` },
        { shape: [M, kv], label: `v ${label}` },
      ],
      label,
    );
  const one = outs('one');
  const two = outs('two');
  const invFreq = ropeInvFreq(ctx, hd);
  const [hq, hv] = h.views as [Tensor, Tensor];
  const [bQ, bV] = bq.views as [Tensor, Tensor];
  const [q1, k1, v1] = one.views as [Tensor, Tensor, Tensor];
  const [q2, k2, v2] = two.views as [Tensor, Tensor, Tensor];
  const rope = { invFreq, headDim: hd, T };
  const fused = await planQkvMatmul(
    ctx,
    x,
    {
      q: { w: wq, out: q1, lora: { h: hq, b: bQ, scale: 2 } },
      k: { w: wk, out: k1 },
      v: { w: wv, out: v1, lora: { h: hv, b: bV, scale: 2 } },
    },
    { rope },
  );
  const plain = [
    await planMatmul(ctx, x, wq, q2, {
      lowRank: { a2: hq, b2: bQ, alpha2: 2 },
      rope: { ...rope, c: true, second: false },
    }),
    await planMatmul(ctx, x, wv, v2, {
      lowRank: { a2: hv, b2: bV, alpha2: 2 },
      second: { w: wk, out: k2 },
      rope: { ...rope, c: false, second: true },
    }),
  ];
  await timeFusion(ctx, o, {
    name: 'qkv_fwd_one',
    baseline: 'qkv_fwd_two',
    shape,
    fused: [fused],
    plain,
    outputs: [
      [q1, q2],
      [k1, k2],
      [v1, v2],
    ],
    flops: matmulFlops({ M, N: d + 2 * kv, K: d }) + matmulFlops({ M, N: d + kv, K: r }),
  });
  for (const t of [fused, ...plain]) t.dispose();
  for (const t of [x, wq, wk, wv, invFreq]) t.dispose();
  for (const a of [h, bq, one, two]) a.dispose();
}

/** lora_da_many: dA = s·gᵀ·x of q and v in all 30 layers of SmolLM2-135M (r = 8), their inputs,
 * g and dA places of three arenas as training lays them out, in one dispatch, against one
 * lora_cols_multi per layer (both roles of a layer reading its n1), what training planned before. */
async function benchLoraDaMany(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const M = o.quick ? 128 : 512;
  const [d, r, L] = [576, 8, 30];
  const shape = `${L} layers × (q, v), T=${M}, N=${d}, r=${r}`;
  const layers = Array.from({ length: L }, (_, i) => i);
  const x = filledArena(
    ctx,
    'lora_x',
    layers.map((i) => `layer${i}.n1`),
    [M, d],
    140,
  );
  const g = filledArena(
    ctx,
    'lora_g_da',
    layers.flatMap((i) => [`layer${i}.q.g`, `layer${i}.v.g`]),
    [M, r],
    141,
  );
  const dA = (label: string) =>
    new TensorArena(
      ctx,
      layers.flatMap((i) => [`q`, `v`].map((role) => ({ shape: [r, d], label: `layer${i}.${role}.dA ${label}` }))),
      label,
    );
  const [many, perLayer] = [dA('many'), dA('per layer')];
  const fused = await planLoraDaMany(
    ctx,
    g.views.map((gv, j) => ({ x: x.views[j >> 1] as Tensor, g: gv, da: many.views[j] as Tensor, scale: 2 })),
    { T: M, beta: 0, label: 'lora_da_many' },
  );
  const plain = await Promise.all(
    layers.map((i) =>
      planLoraColsMulti(
        ctx,
        x.views[i] as Tensor,
        [0, 1].map((k) => ({
          l: g.views[2 * i + k] as Tensor,
          out: perLayer.views[2 * i + k] as Tensor,
          R: r,
          alpha: 2,
          beta: 0,
        })),
        { T: M, N: d },
        `layer${i}.lora_dA`,
      ),
    ),
  );
  await timeFusion(ctx, o, {
    name: 'lora_da_many',
    baseline: 'lora_da_per_layer',
    shape,
    fused: [fused],
    plain,
    outputs: many.views.map((v, j) => [v, perLayer.views[j] as Tensor]),
    flops: 2 * M * d * r * 2 * L,
  });
  for (const t of [fused, ...plain]) t.dispose();
  for (const a of [x, g, many, perLayer]) a.dispose();
}

/** matmul_sum_lr for gate and up, both adapted (all-linear): dgate·Wg + dup·Wu and both LoRA
 * terms in one dispatch, against the two LoRA dx dispatches the plan made before (gate's, then
 * up's accumulating). */
async function benchGateUpDx(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const M = o.quick ? 128 : 512;
  const [d, I, r] = [576, 1536, 8]; // SmolLM2-135M's hidden and intermediate sizes
  const shape = `${M}x${d}, K=${I}+${I}, r=${r}+${r}, W:f16`;
  const act = (seed: number, label: string) => tensorFromData(ctx, random(M * I, seed, 1), [M, I], 'f32', label);
  const [dGate, dUp] = [act(91, 'd_gate'), act(92, 'd_up')];
  const w = (seed: number, label: string) => tensorFromData(ctx, random(I * d, seed, 0.05), [I, d], 'f16', label);
  const [wg, wu] = [w(93, 'w_gate'), w(94, 'w_up')];
  const g = filledArena(ctx, 'g', ['g_gate', 'g_up'], [M, r], 95);
  const loraA = filledArena(ctx, 'lora A', ['A_gate', 'A_up'], [r, d], 97);
  const [gg, gu] = g.views as [Tensor, Tensor];
  const [ag, au] = loraA.views as [Tensor, Tensor];
  const dx = [createTensor(ctx, [M, d], 'f32', 'dx one'), createTensor(ctx, [M, d], 'f32', 'dx two')];
  const fused = await planMatmul(ctx, dGate, wg, dx[0] as Tensor, {
    transW: false,
    lowRank: { a2: gg, b2: ag, alpha2: 2, second: { a2: gu, b2: au, alpha2: 2 } },
    extra: { a: dUp, w: wu },
  });
  const plain = [
    await planMatmul(ctx, dGate, wg, dx[1] as Tensor, { transW: false, lowRank: { a2: gg, b2: ag, alpha2: 2 } }),
    await planMatmul(ctx, dUp, wu, dx[1] as Tensor, { transW: false, beta: 1, lowRank: { a2: gu, b2: au, alpha2: 2 } }),
  ];
  await timeFusion(ctx, o, {
    name: 'gate_up_dx_one',
    baseline: 'gate_up_dx_two',
    shape,
    fused: [fused],
    plain,
    outputs: [[dx[0] as Tensor, dx[1] as Tensor]],
    flops: matmulFlops({ M, N: d, K: 2 * I }, 2 * r),
  });
  for (const t of [fused, ...plain]) t.dispose();
  for (const t of [dGate, dUp, wg, wu, ...dx]) t.dispose();
  g.dispose();
  loraA.dispose();
}

/** rmsnorm_fwd_lora: the input norm of a SmolLM2-135M layer with q and v adapted (q_proj,v_proj),
 * then q, k and v (all-linear), their A in one arena and their h in another, as training lays them
 * out, against the norm followed by lora_rows_multi. */
async function benchRmsNormLoraH(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const [rows, d, r] = [o.quick ? 64 : 512, 576, 8];
  const x = tensorFromData(ctx, random(rows * d, 31, 2), [rows, d], 'f32', 'x');
  const w = tensorFromData(ctx, random(d, 32, 1), [d], 'f32', 'w');
  for (const roles of [
    ['q', 'v'],
    ['q', 'k', 'v'],
  ]) {
    const arena = filledArena(
      ctx,
      'lora params',
      roles.map((role) => `A_${role}`),
      [r, d],
      33,
    );
    const outs = (which: string) => ({
      y: createTensor(ctx, [rows, d], 'f32', `${which} y`),
      rstd: createTensor(ctx, [rows], 'f32', `${which} rstd`),
      h: new TensorArena(
        ctx,
        roles.map((role) => ({ shape: [rows, r], label: `${which} h_${role}` })),
        `${which} h`,
      ),
    });
    const [f, p] = [outs('fused'), outs('plain')];
    const lora = arena.views.map((a, i) => ({ a, h: f.h.views[i] as Tensor }));
    const fused = [await planRmsNormForward(ctx, { x, w, y: f.y, rstd: f.rstd, lora }, { eps: 1e-5 })];
    const plain = [
      await planRmsNormForward(ctx, { x, w, y: p.y, rstd: p.rstd }, { eps: 1e-5 }),
      await planLoraRowsMulti(
        ctx,
        p.y,
        arena.views.map((l, i) => ({ l, out: p.h.views[i] as Tensor, R: r })),
        { M: rows, K: d },
        'lora_rows_multi',
      ),
    ];
    await timeFusion(ctx, o, {
      name: 'rmsnorm_lora_h',
      baseline: 'rmsnorm_then_lora_rows',
      shape: `${rows}x${d} r=${roles.map(() => r).join('+')}`,
      fused,
      plain,
      outputs: [
        [f.y, p.y],
        [f.rstd, p.rstd],
        ...f.h.views.map((h, i): [Tensor, Tensor] => [h, p.h.views[i] as Tensor]),
      ],
    });
    for (const dsp of [...fused, ...plain]) dsp.dispose();
    for (const t of [f.y, f.rstd, p.y, p.rstd]) t.dispose();
    for (const a of [arena, f.h, p.h]) a.dispose();
  }
  for (const t of [x, w]) t.dispose();
}

/** lora_g_db_pair: q (576 columns) and v (192: SmolLM2-135M's grouped KV) of one layer, B and dB in arenas. */
async function benchLoraGdBPair(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const [T, r, scale] = [o.quick ? 64 : 512, 8, 2];
  const cols = [576, 192];
  const arena = (label: string) =>
    new TensorArena(
      ctx,
      cols.map((N, i) => ({ shape: [N, r], label: `${label}${i}` })),
      label,
    );
  const params = arena('B');
  for (const [i, b] of params.views.entries()) writeTensor(b, random((cols[i] as number) * r, 41 + i, 0.05));
  const dys = cols.map((N, i) => tensorFromData(ctx, random(T * N, 43 + i, 1), [T, N], 'f32', `dy${i}`));
  const hs = cols.map((_, i) => tensorFromData(ctx, random(T * r, 45 + i, 1), [T, r], 'f32', `h${i}`));
  const outs = (which: string) => ({
    g: cols.map((_, i) => createTensor(ctx, [T, r], 'f32', `${which} g${i}`)),
    db: arena(`${which} dB`),
  });
  const [f, p] = [outs('fused'), outs('plain')];
  const modules = cols.map((N, i) => ({
    N,
    dy: dys[i] as Tensor,
    b: params.views[i] as Tensor,
    h: hs[i] as Tensor,
  }));
  const pair = modules.map(
    (m, i): LoraGradModule => ({ ...m, g: f.g[i] as Tensor, db: f.db.views[i] as Tensor, scale }),
  );
  const fused = [
    await planLoraGradGdBPair(ctx, [pair[0] as LoraGradModule, pair[1] as LoraGradModule], T, 0, 'lora_g_db_pair'),
  ];
  const plain = await Promise.all(
    modules.map((m, i) =>
      planLoraGradGdB(
        ctx,
        { ...m, g: p.g[i] as Tensor, db: p.db.views[i] as Tensor },
        { T, N: m.N, R: r },
        scale,
        0,
        `lora_g_db ${i}`,
      ),
    ),
  );
  await timeFusion(ctx, o, {
    name: 'lora_g_db_pair',
    baseline: 'two_lora_g_db',
    shape: `T=${T} N=${cols.join('+')} r=${r}`,
    fused,
    plain,
    outputs: [...f.g.map((g, i): [Tensor, Tensor] => [g, p.g[i] as Tensor]), [f.db.tensor, p.db.tensor]],
  });
  for (const dsp of [...fused, ...plain]) dsp.dispose();
  for (const t of [...dys, ...hs, ...f.g, ...p.g]) t.dispose();
  for (const a of [params, f.db, p.db]) a.dispose();
}

/** lora_g_db_many: g and dB of q (576 columns), k and v (192) of one layer, all adapted
 * (all-linear), every operand kind places of one arena as training lays them out, against the pair
 * (q and k) and the lone lora_g_db (v) planned before. */
async function benchLoraGdBMany(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const [T, r, scale] = [o.quick ? 64 : 512, 8, 2];
  const cols = [576, 192, 192];
  const arena = (label: string, shape: (N: number) => number[], seed?: number) => {
    const a = new TensorArena(
      ctx,
      cols.map((N, i) => ({ shape: shape(N), label: `${label}${i}` })),
      label,
    );
    if (seed !== undefined) for (const [i, v] of a.views.entries()) writeTensor(v, random(v.size, seed + i, 0.5));
    return a;
  };
  const [dy, b, h] = [arena('dy', (N) => [T, N], 51), arena('B', (N) => [N, r], 54), arena('h', () => [T, r], 57)];
  const outs = (which: string) => ({ g: arena(`${which} g`, () => [T, r]), db: arena(`${which} dB`, (N) => [N, r]) });
  const [f, p] = [outs('many'), outs('pair')];
  const modules = (x: typeof f) =>
    cols.map(
      (_, i): LoraGradModule => ({
        dy: dy.views[i] as Tensor,
        b: b.views[i] as Tensor,
        h: h.views[i] as Tensor,
        g: x.g.views[i] as Tensor,
        db: x.db.views[i] as Tensor,
        scale,
      }),
    );
  const [mf, mp] = [modules(f), modules(p)];
  const fused = [await planLoraGradGdBMany(ctx, mf, T, 0, 'lora_g_db_many')];
  const v = mp[2] as LoraGradModule;
  const plain = [
    await planLoraGradGdBPair(ctx, [mp[0] as LoraGradModule, mp[1] as LoraGradModule], T, 0, 'lora_g_db_pair'),
    await planLoraGradGdB(ctx, v, { T, N: cols[2] as number, R: r }, scale, 0, 'lora_g_db'),
  ];
  await timeFusion(ctx, o, {
    name: 'lora_g_db_many',
    baseline: 'pair_and_lora_g_db',
    shape: `T=${T} N=${cols.join('+')} r=${r}`,
    fused,
    plain,
    outputs: [
      [f.g.tensor, p.g.tensor],
      [f.db.tensor, p.db.tensor],
    ],
  });
  for (const dsp of [...fused, ...plain]) dsp.dispose();
  for (const a of [dy, b, h, f.g, f.db, p.g, p.db]) a.dispose();
}

/** One reducing kernel, planned on a device: how it records, what reads its result, its cleanup. */
interface ReductionCase {
  readonly record: (enc: StepEncoder) => void;
  readonly result: () => Promise<Float32Array>;
  readonly dispose: () => void;
}

/** The reduction cases: [name, shape, planner]. Shapes of SmolLM2-135M (d = 576, I = 1536) at 4×128. */
function reductionCases(quick: boolean): [string, string, (ctx: GpuContext) => Promise<ReductionCase>][] {
  const rows = quick ? 64 : 512;
  const d = 576;
  const rmsnorm = async (ctx: GpuContext): Promise<ReductionCase> => {
    const x = tensorFromData(ctx, random(rows * d, 21, 2), [rows, d], 'f32', 'x');
    const w = tensorFromData(ctx, random(d, 22, 1), [d], 'f32', 'w');
    const y = createTensor(ctx, [rows, d], 'f32', 'y');
    const rstd = createTensor(ctx, [rows], 'f32', 'rstd');
    const plan = await planRmsNormForward(ctx, { x, w, y, rstd }, { eps: 1e-5 });
    return {
      record: (enc) => enc.dispatch(plan),
      result: () => readFloat32(y),
      dispose: () => {
        plan.dispose();
        for (const t of [x, w, y, rstd]) t.dispose();
      },
    };
  };
  const matvec = async (ctx: GpuContext): Promise<ReductionCase> => {
    const N = 1536;
    const x = tensorFromData(ctx, random(d, 23, 1), [1, d], 'f32', 'x');
    const w = tensorFromData(ctx, random(N * d, 24, 0.05), [N, d], 'f16', 'w');
    const c = createTensor(ctx, [1, N], 'f32', 'c');
    const plan = await planMatmul(ctx, x, w, c, { matvecVariant: 'split-k' });
    return {
      record: (enc) => enc.dispatch(plan),
      result: () => readFloat32(c),
      dispose: () => {
        plan.dispose();
        for (const t of [x, w, c]) t.dispose();
      },
    };
  };
  const vocab = quick ? 4096 : 49152;
  const loss = async (ctx: GpuContext): Promise<ReductionCase> => {
    const lossRows = quick ? 16 : 128;
    const h = tensorFromData(ctx, random(lossRows * 64, 25, 1), [lossRows, 64], 'f32', 'h');
    const e = tensorFromData(ctx, random(vocab * 64, 26, 0.1), [vocab, 64], 'f16', 'e');
    const labels = tensorFromData(
      ctx,
      Array.from({ length: lossRows }, (_, i) => (i * 7919) % vocab),
      [lossRows],
      'i32',
      'labels',
    );
    const t = {
      h,
      e,
      labels,
      lse: createTensor(ctx, [lossRows], 'f32', 'lse'),
      loss: createTensor(ctx, [2], 'f32', 'loss'),
      errors: createTensor(ctx, [2], 'u32', 'errors'),
    };
    const plan = await planCrossEntropyForward(ctx, t, {});
    return {
      record: (enc) => plan.record(enc),
      result: () => readFloat32(t.lse),
      dispose: () => {
        plan.dispose();
        for (const x of Object.values(t)) x.dispose();
      },
    };
  };
  // lora_rows's tree split: each 4×4 block of h split over a workgroup along d.
  const r = 8;
  const loraRows = async (ctx: GpuContext): Promise<ReductionCase> => {
    const x = tensorFromData(ctx, random(rows * d, 27, 1), [rows, d], 'f32', 'x');
    const a = tensorFromData(ctx, random(r * d, 28, 0.05), [r, d], 'f32', 'a');
    const h = createTensor(ctx, [rows, r], 'f32', 'h');
    const plan = await planLoraRows(ctx, x, a, h, { M: rows, K: d, R: r }, true, 'bench lora_rows', {
      split: 'tree',
    });
    return {
      record: (enc) => enc.dispatch(plan),
      result: () => readFloat32(h),
      dispose: () => {
        plan.dispose();
        for (const t of [x, a, h]) t.dispose();
      },
    };
  };
  return [
    ['rmsnorm', `${rows}x${d}`, rmsnorm],
    ['lora_rows h = x·Aᵀ', `${rows}x${d} r=${r}`, loraRows],
    ['matvec split-k', `1x1536x${d} W:f16`, matvec],
    ['cross-entropy forward', `${quick ? 16 : 128} rows x V=${vocab} x 64`, loss],
  ];
}

async function benchSubgroupReductions(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!ctx.features.subgroups) {
    o.status('subgroup_reductions: skipped, the adapter has no subgroups (or they failed the layout probe)');
    return;
  }
  const featureLevel = ctx.adapter.featureLevel;
  const make = (allowSubgroups: boolean) =>
    createGpuContext({
      featureLevel,
      kernelProfile: 'gpu',
      allowSubgroups,
      label: `bench ${allowSubgroups ? 'subgroups' : 'trees'}`,
    });
  const sub = await make(true);
  const tree = await make(false);
  try {
    for (const [name, shape, plan] of reductionCases(o.quick)) {
      if (!wanted(o, `${name} ${shape}`)) continue;
      o.status(`subgroup_reductions ${name} ${shape}`);
      const mine = await plan(sub);
      const base = await plan(tree);
      const run = async (c: GpuContext, r: ReductionCase) => {
        const enc = new StepEncoder(c, name);
        r.record(enc);
        enc.submit();
        await enc.done();
      };
      // Both builds compute the same values, up to the order of the additions.
      await run(sub, mine);
      await run(tree, base);
      const [x, y] = [await mine.result(), await base.result()];
      const maxDiff = maxAbsDiff(x, y);
      if (!(maxDiff < 1e-3))
        throw new Error(`subgroup and tree builds disagree on ${name} ${shape}: max |diff| ${maxDiff}`);
      const {
        mine: m,
        baseline: b,
        spread,
      } = await timePair(
        () => run(sub, mine),
        () => run(tree, base),
        rounds(o),
      );
      o.report({
        name: 'subgroup_reductions',
        shape: `${name} ${shape}`,
        ms: m.medianMs,
        gflops: null,
        baseline: 'workgroup_trees',
        baselineMs: b.medianMs,
        ratio: b.medianMs / m.medianMs,
        adapter: o.adapter,
        extra: { subgroup_size: sub.features.subgroupSize, max_abs_diff: maxDiff, ...spreadExtra(spread) },
      });
      mine.dispose();
      base.dispose();
    }
  } finally {
    sub.destroy();
    tree.destroy();
  }
}

/** The naive product's variants in dispatch_cost: each adds one trait of matmul.wgsl's kernel. */
const NAIVE_TRAITS = ['plain', 'bindings', 'workgroup', 'dead_code', 'uniform_loop'] as const;
type NaiveTrait = (typeof NAIVE_TRAITS)[number];

/** A naive x·Wᵀ (one output per invocation) in WGSL of its own, with one of matmul.wgsl's traits:
 * its bind group layout (uniforms at 0, x at 1, W at 2, C at 6), 4 KiB of workgroup memory and a
 * barrier, 12 KiB of code behind a test that is never true, or its loop bound read from the
 * uniforms. */
function naiveMatmulWgsl(trait: NaiveTrait, M: number, N: number, K: number): string {
  const ownLayout = trait === 'bindings' || trait === 'uniform_loop';
  const dead = Array.from(
    { length: 120 },
    (_, i) => `    s = s * ${(1 + i / 1000).toFixed(3)} + sin(s * ${i + 1}.0) * cos(f32(id.x + ${i}u));`,
  ).join('\n');
  return `${
    ownLayout
      ? `@group(0) @binding(0) var<uniform> u: array<vec4u, 2>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read_write> c: array<f32>;`
      : `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;`
  }
${trait === 'workgroup' ? 'var<workgroup> tile: array<vec4f, 256>;' : ''}
@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) id: vec3u, @builtin(local_invocation_index) li: u32) {
  ${trait === 'workgroup' ? 'tile[li] = vec4f(f32(li));\n  workgroupBarrier();' : ''}
  if (id.x >= ${N}u || id.y >= ${M}u) { return; }
  var s = 0.0;
  for (var k = 0u; k < ${trait === 'uniform_loop' ? `min(u[0].z, ${K}u)` : `${K}u`}; k++) {
    s += a[id.y * ${K}u + k] * w[id.x * ${K}u + k];
  }
  ${trait === 'dead_code' ? `if (a[0] == 12345.0 && w[1] == 54321.0) {\n${dead}\n  }` : ''}
  ${trait === 'bindings' ? 'if (u[0].x == 7777u) { s += 1.0; }' : ''}
  ${trait === 'workgroup' ? 's += tile[(li + 1u) % 64u].x * 0.0;' : ''}
  c[id.y * ${N}u + id.x] = s;
}`;
}

/**
 * What one dispatch costs beside its work: a small x·Wᵀ through matmul.wgsl's `matmul` entry as
 * planned, dispatched 20 times in one pass, against the same pipeline built from only the WGSL
 * that entry reaches (pruneWgsl, its overrides written in as consts), and against a naive product
 * in a module of its own, plain and with one of the matmul kernel's traits each (naiveMatmulWgsl),
 * and against the pruned module with its uniforms where no load has a constant offset
 * (uninlinableMatmul); ms per dispatch, ratio = the other's ms / the planned matmul's. Only with
 * `--only dispatch_cost`.
 *
 * Chromium's compatibility adapter on Mesa 22's lavapipe (Dawn's OpenGL ES backend over ANGLE)
 * charged 6–8 ms for each 32×32×32 matmul dispatch and 0.2–1.1 for the naive one, whatever trait it
 * had; the pruned module (13.5 KB of WGSL against 84 KB) as much as the planned one; with Mesa's
 * shader cache off (MESA_SHADER_CACHE_DISABLE=true) 0.44–1.17 s for each matmul dispatch and the
 * naive ones still under 2.5 ms; the pruned module with unknowable uniform offsets 0.17. Cause:
 * lavapipe's uniform inlining, which Mesa 22 redoes, compile included, whenever the pipeline is
 * bound, and ANGLE binds it at every dispatch (tools/chromium.ts, chromiumEnv). The naive kernels
 * are under its size threshold. Over Mesa 25's lavapipe (`--adapter lavapipe25`) the same matmul
 * dispatch costs 0.14 ms.
 */
async function benchDispatchCost(ctx: GpuContext, o: BenchOptions): Promise<void> {
  const REPS = 20;
  for (const [M, N, K] of [
    [32, 32, 32],
    [128, 64, 64],
  ] as const) {
    // --shape against the label's start: its WGSL sizes are known only once it is planned.
    if (!wanted(o, `${M}x${N}x${K} x·Wᵀ`)) continue;
    const a = tensorFromData(ctx, random(M * K, 7, 1), [M, K], 'f32', 'a');
    const w = tensorFromData(ctx, random(N * K, 8, 0.05), [N, K], 'f32', 'w');
    const c = createTensor(ctx, [M, N], 'f32', 'c');
    const mm = await planMatmul(ctx, a, w, c, { transW: true });
    const k = mm.kernel;
    const layout = ctx.device.createPipelineLayout({ bindGroupLayouts: [k.layout] });
    const pruned = pruneWgsl(k.spec.source, k.spec.entryPoint, k.constants);
    const prunedPipeline = await ctx.device.createComputePipelineAsync({
      layout,
      compute: { module: ctx.device.createShaderModule({ code: pruned }), entryPoint: k.spec.entryPoint },
    });
    const run = async (pipeline: GPUComputePipeline, bind: GPUBindGroup, groups: Workgroups) => {
      const enc = ctx.device.createCommandEncoder();
      const pass = enc.beginComputePass();
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, bind);
      for (let i = 0; i < REPS; i++) pass.dispatchWorkgroups(groups[0], groups[1] ?? 1, groups[2] ?? 1);
      pass.end();
      ctx.device.queue.submit([enc.finish()]);
      await ctx.device.queue.onSubmittedWorkDone();
    };
    const planned = () => run(k.pipeline, mm.bindGroup, mm.workgroups);
    const variants: [string, () => Promise<void>][] = [
      ['pruned', () => run(prunedPipeline, mm.bindGroup, mm.workgroups)],
    ];
    const noInline = await uninlinableMatmul(ctx, k, pruned, layout, { M, N, K }, { a, w, c });
    if (noInline) {
      // It must compute the same product, or its speed would prove nothing.
      await planned();
      const want = await readFloat32(c);
      ctx.device.queue.writeBuffer(c.buffer, c.byteOffset, new Float32Array(M * N));
      await run(noInline.pipeline, noInline.bind, mm.workgroups);
      const diff = maxAbsDiff(await readFloat32(c), want);
      if (!(diff <= 1e-5))
        throw new Error(`dispatch_cost: pruned_no_inline differs from the planned matmul by ${diff}`);
      variants.push(['pruned_no_inline', () => run(noInline.pipeline, noInline.bind, mm.workgroups)]);
    }
    for (const trait of NAIVE_TRAITS) {
      const module = ctx.device.createShaderModule({ code: naiveMatmulWgsl(trait, M, N, K) });
      const ownLayout = trait === 'bindings' || trait === 'uniform_loop';
      const pipeline = await ctx.device.createComputePipelineAsync({
        layout: ownLayout ? layout : 'auto',
        compute: { module, entryPoint: 'main' },
      });
      // With matmul's layout the planned dispatch's bind group serves (uniforms, x, W, C).
      const bind = ownLayout
        ? mm.bindGroup
        : ctx.device.createBindGroup({
            layout: pipeline.getBindGroupLayout(0),
            entries: [a, w, c].map((t, binding) => ({ binding, resource: { buffer: t.buffer } })),
          });
      variants.push([`naive_${trait}`, () => run(pipeline, bind, [Math.ceil(N / 8), Math.ceil(M / 8)])]);
    }
    // Each variant against the planned matmul, sample by sample (timePair): ms per dispatch.
    for (const [name, variant] of variants) {
      o.status(`dispatch_cost ${M}x${N}x${K} ${name}`);
      const { mine, baseline, spread } = await timePair(planned, variant, rounds(o));
      const ms = mine.medianMs / REPS;
      o.report({
        name: 'dispatch_cost',
        shape: `${M}x${N}x${K} x·Wᵀ, ${REPS} dispatches a pass, ms each (WGSL ${k.spec.source.length} B, pruned ${pruned.length} B)`,
        ms,
        gflops: gflops(2 * M * N * K, ms),
        baseline: `dispatch_${name}`,
        baselineMs: baseline.medianMs / REPS,
        ratio: baseline.medianMs / mine.medianMs,
        adapter: o.adapter,
        extra: { dispatches: REPS, ...spreadExtra(spread) },
      });
    }
    mm.dispose();
    noInline?.dispose();
    for (const t of [a, w, c]) t.dispose();
  }
}

/**
 * The pruned matmul with its uniforms out of a driver's reach: the block is bound as an array of
 * two copies and read through an index the compiler cannot know (0 unless A is empty; with one
 * element the bounds clamp would make it 0 again), so no load of it has a constant offset. Mesa's
 * lavapipe specialises a large shader on the values of uniforms that its loops and branches read at
 * constant offsets (its uniform inlining), and Mesa 22's compiles that variant again every time the
 * pipeline is bound; with the offsets unknown it finds none to inline. The kernel's own layout,
 * with a uniform buffer of its own (M, N, K; alpha and rope_scaling 1, the rest 0, as matmul.ts
 * packs them), A, W and C at their bindings and a placeholder at the others; undefined when the
 * WGSL is not as expected.
 */
async function uninlinableMatmul(
  ctx: GpuContext,
  k: Dispatch['kernel'],
  pruned: string,
  layout: GPUPipelineLayout,
  dims: { M: number; N: number; K: number },
  operands: { a: Tensor; w: Tensor; c: Tensor },
): Promise<{ pipeline: GPUComputePipeline; bind: GPUBindGroup; dispose(): void } | undefined> {
  const decl = /@group\(0\) @binding\(0\) var<uniform> p: Params;/;
  const struct = /struct Params \{([^}]*)\}/.exec(pruned);
  if (!decl.test(pruned) || !struct) return undefined;
  const fields = [...(struct[1] as string).matchAll(/(\w+)\s*:\s*(u32|f32)/g)].map((m) => [m[1], m[2]] as const);
  const size = Math.ceil((fields.length * 4) / 16) * 16;
  // Every read of the block goes through that index (a private copy would not be uniform, and
  // the kernel's barriers sit in loops bounded by the block's values).
  const source = pruned
    .replace(
      decl,
      `struct ParamsBox { @size(${size}) v: Params, }\n@group(0) @binding(0) var<uniform> p_in: array<ParamsBox, 2>;`,
    )
    .replace(/\bp\./g, 'p_in[select(0u, 1u, arrayLength(&a) == 0u)].v.');
  // Binding number → name, from the whole module (the layout has every binding of the kernel).
  const names = new Map(
    [...k.spec.source.matchAll(/@binding\((\d+)\) var<[^>]*> (\w+)/g)].map((m) => [Number(m[1]), m[2]] as const),
  );
  const data = new ArrayBuffer(2 * size);
  const u32 = new Uint32Array(data);
  const f32 = new Float32Array(data);
  fields.forEach(([name, type], i) => {
    const value = { M: dims.M, N: dims.N, K: dims.K, alpha: 1, rope_scaling: 1 }[name as string] ?? 0;
    for (const at of [i, i + size / 4]) {
      if (type === 'f32') f32[at] = value;
      else u32[at] = value;
    }
  });
  const uniform = ctx.device.createBuffer({ size: 2 * size, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  ctx.device.queue.writeBuffer(uniform, 0, data);
  const placeholder = ctx.device.createBuffer({ size: 256, usage: GPUBufferUsage.STORAGE });
  const byName: Record<string, GPUBuffer> = { a: operands.a.buffer, w: operands.w.buffer, c: operands.c.buffer };
  // A Params field this packing does not know (not a 4-byte scalar) would fail here: no variant then.
  ctx.device.pushErrorScope('validation');
  const pipeline = await ctx.device
    .createComputePipelineAsync({
      layout,
      compute: { module: ctx.device.createShaderModule({ code: source }), entryPoint: k.spec.entryPoint },
    })
    .catch(() => undefined);
  const invalid = await ctx.device.popErrorScope();
  if (!pipeline || invalid) {
    uniform.destroy();
    placeholder.destroy();
    return undefined;
  }
  const entries: GPUBindGroupEntry[] = [];
  k.spec.bindings.forEach((kind, binding) => {
    if (kind === 'none') return;
    const buffer = binding === 0 ? uniform : (byName[names.get(binding) ?? ''] ?? placeholder);
    entries.push({ binding, resource: { buffer } });
  });
  const bind = ctx.device.createBindGroup({ layout: k.layout, entries });
  return {
    pipeline,
    bind,
    dispose: () => {
      uniform.destroy();
      placeholder.destroy();
    },
  };
}

export async function runKernelBenchmarks(ctx: GpuContext, o: BenchOptions): Promise<void> {
  if (!o.only || 'matmul'.includes(o.only)) await benchMatmul(ctx, o);
  if (!o.only || 'matmul_direct'.includes(o.only)) await benchMatmulDirect(ctx, o);
  if (!o.only || 'matmul_f16_tiles'.includes(o.only)) await benchF16Tiles(ctx, o);
  if (!o.only || 'attention_f16_tiles'.includes(o.only)) await benchAttentionF16(ctx, o);
  if (!o.only || 'lora_fwd_bwd'.includes(o.only)) await benchLora(ctx, o);
  if (!o.only || 'attention_bwd_one'.includes(o.only)) await benchAttentionBwd(ctx, o);
  if (!o.only || 'attention_bwd_f16_tiles'.includes(o.only)) await benchAttentionBwdF16(ctx, o);
  if (!o.only || 'matmul_rope'.includes(o.only)) await benchMatmulRope(ctx, o);
  if (!o.only || 'glu_norm'.includes(o.only)) await benchGluNorm(ctx, o);
  if (!o.only || 'matmul_resid'.includes(o.only)) await benchMatmulResid(ctx, o);
  if (!o.only || 'lora_h_in_matmul'.includes(o.only)) await benchLoraHInMatmul(ctx, o);
  if (!o.only || 'norm_bwd_in_dx'.includes(o.only)) await benchNormBwdInDx(ctx, o);
  if (!o.only || 'norm1_in_down_dx'.includes(o.only)) await benchNorm1InDownDx(ctx, o);
  if (!o.only || 'loss_dz_in_dh'.includes(o.only)) await benchLossDz(ctx, o);
  if (!o.only || 'qkv_fwd_one'.includes(o.only)) await benchQkvForward(ctx, o);
  if (!o.only || 'qkv_dx_one'.includes(o.only)) await benchQkvDx(ctx, o);
  if (!o.only || 'gate_up_dx_one'.includes(o.only)) await benchGateUpDx(ctx, o);
  if (!o.only || 'rmsnorm_lora_h'.includes(o.only)) await benchRmsNormLoraH(ctx, o);
  if (!o.only || 'lora_g_db_pair'.includes(o.only)) await benchLoraGdBPair(ctx, o);
  if (!o.only || 'lora_g_db_many'.includes(o.only)) await benchLoraGdBMany(ctx, o);
  if (!o.only || 'lora_da_many'.includes(o.only)) await benchLoraDaMany(ctx, o);
  if (!o.only || 'subgroup_reductions'.includes(o.only)) await benchSubgroupReductions(ctx, o);
  if (o.only && 'dispatch_cost'.includes(o.only)) await benchDispatchCost(ctx, o);
}
