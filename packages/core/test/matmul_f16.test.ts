// The tiled matmul with f16 tiles (shaders/tile_f16.wgsl) against the float64 reference (with LoRA
// terms, LoRA's h formed in the dispatch, and q, k and v in one dispatch), and the
// split-K matrix-vector kernel on both reduction builds: the matmul cases of the adapters with
// shader-f16 or other subgroup sizes (the node-lavapipe-f16 project: Mesa 25 lavapipe, where every
// pipeline of matmul.test.ts would take seconds to compile). Elsewhere the f16 cases skip.
import { describe, expect, it } from 'vitest';
import { siluMulBackwardRef } from '../ref/activations.js';
import { asStored, randomArray } from '../ref/check.js';
import { addRef, matmulRef } from '../ref/matmul.js';
import { rmsnormForwardRef } from '../ref/rmsnorm.js';
import { ropeForwardRef } from '../ref/rope.js';
import {
  createTensor,
  type DType,
  f16TileMathApplies,
  planMatmul,
  planQkvMatmul,
  type QkvProjection,
  readFloat32,
  StepEncoder,
  type Tensor,
  tensorFromData,
  tensorView,
  writeTensor,
} from '../src/index.js';
import { expectClose, gpuCase, useReductionPaths } from './gpu.js';

const paths = useReductionPaths();
const gpu = paths[0].gpu;
const STAGINGS = ['workgroup', 'direct'] as const;

// f16 tiles (shaders/tile_f16.wgsl, adapters with shader-f16): A and W staged in f16, four products
// at a time in f16, added in f32. Against the float64 product of the stored W: A's rounding to f16
// and the f16 products and sums give errors of a few f16 ulps (2^-11) per term, growing as √K.
describe('matmul with f16 tiles', () => {
  const f16Cases: { M: number; N: number; K: number; w: DType; bias?: boolean; beta?: number }[] = [
    { M: 7, N: 65, K: 64, w: 'f16', bias: true },
    { M: 65, N: 63, K: 257, w: 'f16', beta: 1 },
    { M: 33, N: 64, K: 96, w: 'q8_0' },
    { M: 9, N: 257, K: 1031, w: 'f16', bias: true },
    { M: 5, N: 7, K: 64, w: 'q4_0', beta: 1 },
  ];
  // Each both ways: operands staged through workgroup memory, and read straight from the buffers
  // (DIRECT, where a CPU driver measured that faster), the same f16 products either way.
  for (const [c, staging] of f16Cases.flatMap((c) => STAGINGS.map((s) => [c, s] as const))) {
    const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w}${c.bias ? ' +bias' : ''}${c.beta ? ' +=C' : ''} (${staging})`;
    it(name, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const seed = 7 * c.M + c.N + c.K;
      const a = randomArray(c.M * c.K, seed, 1);
      const w = asStored(randomArray(c.N * c.K, seed + 1, 1), c.w);
      const bias = randomArray(c.N, seed + 2, 1);
      const c0 = randomArray(c.M * c.N, seed + 3, 1);
      let want = matmulRef(a, w, c.M, c.K, c.N, { transB: true });
      if (c.bias) want = want.map((v, i) => v + (bias[i % c.N] as number));
      if (c.beta) want = addRef(want, c0, c.beta);
      const got = await gpuCase(ctx, name, async () => {
        const ta = tensorFromData(ctx, a, [c.M, c.K], 'f32', 'a');
        const tw = tensorFromData(ctx, w, [c.N, c.K], c.w, 'w');
        const tb = tensorFromData(ctx, bias, [c.N], 'f32', 'bias');
        const tc = c.beta ? tensorFromData(ctx, c0, [c.M, c.N], 'f32', 'c') : createTensor(ctx, [c.M, c.N], 'f32', 'c');
        expect(f16TileMathApplies(ctx, tw)).toBe(true);
        const d = await planMatmul(ctx, ta, tw, tc, {
          bias: c.bias ? tb : undefined,
          beta: c.beta ?? 0,
          tileMath: 'f16',
          staging,
        });
        expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = await readFloat32(tc);
        d.dispose();
        for (const x of [ta, tw, tb, tc]) x.dispose();
        return out;
      });
      expectClose(ctx, `${name} f16 tiles`, got, want, 4e-3 * Math.sqrt(c.K), 2e-3);
    });
  }

  // A LoRA term beside f16 tiles (the forward of an adapted projection): alpha2·A2·B2ᵀ is read and
  // multiplied in f32 (low_rank_direct), not staged. The second case has W = 0 and a B of 1e-7 to
  // 1e-6, below f16's smallest normal (6e-5) and partly below its smallest subnormal (6e-8):
  // through f16 tiles it would lose most of its bits or flush to zero, so there C must match the
  // float64 low-rank product to f32 precision.
  const loraCases: { M: number; N: number; K: number; r: number; w: DType; bScale: number; zeroW?: boolean }[] = [
    { M: 33, N: 63, K: 96, r: 8, w: 'f16', bScale: 0.05 },
    { M: 9, N: 64, K: 64, r: 3, w: 'f16', bScale: 1e-6, zeroW: true },
    { M: 65, N: 40, K: 64, r: 16, w: 'q8_0', bScale: 0.02 },
  ];
  for (const [c, staging] of loraCases.flatMap((c) => STAGINGS.map((s) => [c, s] as const))) {
    const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w} + LoRA r=${c.r} (B ~${c.bScale}${c.zeroW ? ', W = 0' : ''}) (${staging})`;
    it(name, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const seed = 3 * c.M + c.N + c.r;
      const alpha2 = 2;
      const a = randomArray(c.M * c.K, seed, 1);
      const w = c.zeroW ? new Float64Array(c.N * c.K) : asStored(randomArray(c.N * c.K, seed + 1, 1), c.w);
      const h = randomArray(c.M * c.r, seed + 2, 1);
      const b = Float64Array.from(randomArray(c.N * c.r, seed + 3, c.bScale), (v) => Math.fround(v));
      const lora = matmulRef(h, b, c.M, c.r, c.N, { transB: true }).map((v) => alpha2 * v);
      const want = addRef(matmulRef(a, w, c.M, c.K, c.N, { transB: true }), lora, 1);
      const got = await gpuCase(ctx, name, async () => {
        const ta = tensorFromData(ctx, a, [c.M, c.K], 'f32', 'a');
        const tw = tensorFromData(ctx, w, [c.N, c.K], c.w, 'w');
        const th = tensorFromData(ctx, h, [c.M, c.r], 'f32', 'h');
        const tb = tensorFromData(ctx, b, [c.N, c.r], 'f32', 'B');
        const tc = createTensor(ctx, [c.M, c.N], 'f32', 'c');
        const lowRank = { a2: th, b2: tb, alpha2 };
        expect(f16TileMathApplies(ctx, tw, { lowRank })).toBe(true);
        const d = await planMatmul(ctx, ta, tw, tc, { lowRank, tileMath: 'f16', staging });
        expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = await readFloat32(tc);
        d.dispose();
        for (const x of [ta, tw, th, tb, tc]) x.dispose();
        return out;
      });
      if (c.zeroW) expectClose(ctx, `${name} f16 tiles`, got, want, 1e-11, 1e-5);
      else expectClose(ctx, `${name} f16 tiles`, got, want, 4e-3 * Math.sqrt(c.K), 2e-3);
    });
  }

  // The gated MLP behind its RMSNorm with f16 tiles (matmul_glu_norm): rows staged already
  // normalized, so rows of 1e5 (raw, x·g would pass f16's 65504) stage like rows of 1e-3.
  it('gated MLP behind its RMSNorm, rows of 1e-3 to 1e5', async (t) => {
    const ctx = gpu();
    if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
    const [M, N, K] = [40, 63, 96];
    const x = randomArray(M * K, 41, 1);
    for (let r = 0; r < M; r++)
      for (let k = 0; k < K; k++) x[r * K + k] = (x[r * K + k] as number) * 10 ** ((r % 9) - 3);
    const gain = randomArray(K, 42, 1);
    const wg = asStored(randomArray(N * K, 43, 1), 'f16');
    const wu = asStored(randomArray(N * K, 44, 1), 'q8_0');
    const norm = rmsnormForwardRef({ rows: M, d: K, x, w: gain, eps: 1e-6 });
    const gate = matmulRef(norm.y, wg, M, K, N, { transB: true });
    const up = matmulRef(norm.y, wu, M, K, N, { transB: true });
    const got = await gpuCase(ctx, 'glu norm f16', async () => {
      const tx = tensorFromData(ctx, x, [M, K], 'f32', 'x');
      const tn = tensorFromData(ctx, gain, [K], 'f32', 'norm.w');
      const twg = tensorFromData(ctx, wg, [N, K], 'f16', 'w_gate');
      const twu = tensorFromData(ctx, wu, [N, K], 'q8_0', 'w_up');
      const [tg, tu, ta] = ['gate', 'up', 'act'].map((l) => createTensor(ctx, [M, N], 'f32', l)) as [
        Tensor,
        Tensor,
        Tensor,
      ];
      const tr = createTensor(ctx, [M], 'f32', 'rstd');
      const opts = { glu: { w: twu, up: tu, act: ta }, norm: { w: tn, rstd: tr, eps: 1e-6 } };
      expect(f16TileMathApplies(ctx, twg, opts)).toBe(true);
      const d = await planMatmul(ctx, tx, twg, tg, { ...opts, tileMath: 'f16' });
      expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
      new StepEncoder(ctx, 'glu norm f16').dispatch(d).submit();
      const out = { gate: await readFloat32(tg), up: await readFloat32(tu), rstd: await readFloat32(tr) };
      d.dispose();
      for (const b of [tx, tn, twg, twu, tg, tu, ta, tr]) b.dispose();
      return out;
    });
    expectClose(ctx, 'glu norm f16 rstd', got.rstd, norm.rstd, 0, 1e-5);
    expectClose(ctx, 'glu norm f16 gate', got.gate, gate, 4e-3 * Math.sqrt(K), 2e-3);
    expectClose(ctx, 'glu norm f16 up', got.up, up, 4e-3 * Math.sqrt(K), 2e-3);
  });

  // LoRA's h formed in the dispatch with f16 tiles (matmul_lora_h; the trainer's forward on GPUs):
  // h = x·Aᵀ in f32 from the f16-staged x, and alpha2·h·B2ᵀ in f32 from workgroup memory. Against
  // the float64 h of x rounded to f16, so h and, where W = 0 and B is 1e-7 to 1e-6 (below f16's
  // normals), C must match to f32 precision: only the main product may carry f16's error.
  const loraHCases: { M: number; N: number; K: number; r: number; w: DType; bScale: number; zeroW?: boolean }[] = [
    { M: 40, N: 72, K: 96, r: 8, w: 'f16', bScale: 0.05 },
    { M: 33, N: 63, K: 64, r: 5, w: 'q8_0', bScale: 0.02 },
    { M: 9, N: 64, K: 40, r: 3, w: 'f16', bScale: 1e-6, zeroW: true },
  ];
  for (const c of loraHCases) {
    const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w} + LoRA r=${c.r} with h formed in the dispatch (B ~${c.bScale}${c.zeroW ? ', W = 0' : ''})`;
    it(name, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const seed = 5 * c.M + c.N + c.r;
      const alpha2 = 2;
      const x = randomArray(c.M * c.K, seed, 1);
      const w = c.zeroW ? new Float64Array(c.N * c.K) : asStored(randomArray(c.N * c.K, seed + 1, 1), c.w);
      const la = Float64Array.from(randomArray(c.r * c.K, seed + 2, 1), (v) => Math.fround(v));
      const b = Float64Array.from(randomArray(c.N * c.r, seed + 3, c.bScale), (v) => Math.fround(v));
      const h = matmulRef(asStored(x, 'f16'), la, c.M, c.K, c.r, { transB: true });
      const lora = matmulRef(h, b, c.M, c.r, c.N, { transB: true }).map((v) => alpha2 * v);
      const want = addRef(matmulRef(x, w, c.M, c.K, c.N, { transB: true }), lora, 1);
      const got = await gpuCase(ctx, name, async () => {
        const tx = tensorFromData(ctx, x, [c.M, c.K], 'f32', 'x');
        const tw = tensorFromData(ctx, w, [c.N, c.K], c.w, 'w');
        const ta = tensorFromData(ctx, la, [c.r, c.K], 'f32', 'lora_A');
        const tb = tensorFromData(ctx, b, [c.N, c.r], 'f32', 'lora_B');
        const th = tensorFromData(ctx, new Float32Array(c.M * c.r).fill(Number.NaN), [c.M, c.r], 'f32', 'h');
        const tc = createTensor(ctx, [c.M, c.N], 'f32', 'c');
        const lowRank = { a2: th, b2: tb, alpha2, a2From: ta };
        expect(f16TileMathApplies(ctx, tw, { lowRank })).toBe(true);
        const d = await planMatmul(ctx, tx, tw, tc, { lowRank, tileMath: 'f16' });
        expect(d.kernel.spec.entryPoint).toBe('matmul_lora_h');
        expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = { c: await readFloat32(tc), h: await readFloat32(th) };
        d.dispose();
        for (const b of [tx, tw, ta, tb, th, tc]) b.dispose();
        return out;
      });
      expectClose(ctx, `${name} h`, got.h, h, 2e-5 * Math.sqrt(c.K), 1e-5);
      if (c.zeroW) expectClose(ctx, `${name} f16 tiles`, got.c, want, 1e-11, 1e-5);
      else expectClose(ctx, `${name} f16 tiles`, got.c, want, 4e-3 * Math.sqrt(c.K), 2e-3);
    });
  }

  // q, k and v in one dispatch with f16 tiles (matmul_qkv; the trainer's forward on GPUs): their
  // LoRA terms are read and multiplied in f32 (low_rank_direct_term), in RoPE's column order where
  // q and k are rotated. The projection with W = 0 and B of 1e-7 to 1e-6 must match the float64
  // low-rank product to f32 precision; the others f16's bounds.
  const qkvCases: {
    M: number;
    K: number;
    widths: [number, number, number];
    ranks: [number, number, number];
    w: [DType, DType, DType];
    zero: number;
    rope?: { hd: number; T: number };
  }[] = [
    {
      M: 40,
      K: 64,
      widths: [64, 32, 32],
      ranks: [8, 4, 0],
      w: ['f16', 'f16', 'q8_0'],
      zero: 1,
      rope: { hd: 16, T: 10 },
    },
    { M: 33, K: 96, widths: [32, 32, 16], ranks: [3, 5, 1], w: ['q8_0', 'f16', 'f16'], zero: 2 },
  ];
  for (const c of qkvCases) {
    const name = `q|k|v ${c.widths.join('|')} M=${c.M} K=${c.K} W:${c.w.join('/')} ranks ${c.ranks.join('/')}${c.rope ? ' RoPE' : ''}, ${'qkv'[c.zero]} with W = 0 and a tiny B`;
    it(name, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const seed = 11 * c.M + c.K;
      const x = randomArray(c.M * c.K, seed, 1);
      const invFreq = c.rope
        ? Float32Array.from({ length: c.rope.hd / 2 }, (_, i) => 10000 ** (-(2 * i) / (c.rope?.hd ?? 1)))
        : new Float32Array(0);
      const parts = c.widths.map((N, i) => {
        const r = c.ranks[i] as number;
        const zero = i === c.zero;
        const w = zero
          ? new Float64Array(N * c.K)
          : asStored(randomArray(N * c.K, seed + 10 * i + 1, 1), c.w[i] as DType);
        const h = Float64Array.from(randomArray(c.M * r, seed + 10 * i + 2, 1), (v) => Math.fround(v));
        const b = Float64Array.from(randomArray(N * r, seed + 10 * i + 3, zero ? 1e-6 : 0.05), (v) => Math.fround(v));
        const scale = 1.5 - i;
        let want = matmulRef(x, w, c.M, c.K, N, { transB: true });
        if (r) want = addRef(want, matmulRef(h, b, c.M, r, N, { transB: true }), scale);
        if (c.rope && i < 2)
          want = ropeForwardRef({
            rows: c.M,
            T: c.rope.T,
            pos0: 0,
            nHeads: N / c.rope.hd,
            headDim: c.rope.hd,
            invFreq,
            attentionScaling: 1,
            x: want,
          }).y;
        return { N, r, w, h, b, scale, want, zero };
      });
      const got = await gpuCase(ctx, name, async () => {
        const owned: Tensor[] = [];
        const own = (t: Tensor) => {
          owned.push(t);
          return t;
        };
        // Each kind of operand as places of one buffer, 256 bytes apart.
        const arena = (label: string, sizes: number[]) => {
          const at = sizes.map((_, i) => sizes.slice(0, i).reduce((n, s) => n + Math.ceil((s * 4) / 256) * 256, 0));
          const total = sizes.reduce((n, s) => n + Math.ceil((s * 4) / 256) * 256, 0);
          return { buf: own(createTensor(ctx, [total / 4], 'f32', label)), at };
        };
        const outs = arena(
          'qkv',
          parts.map((p) => c.M * p.N),
        );
        const hs = arena(
          'h',
          parts.map((p) => Math.max(1, c.M * p.r)),
        );
        const bs = arena(
          'b',
          parts.map((p) => Math.max(1, p.N * p.r)),
        );
        const projection = (i: number): QkvProjection => {
          const p = parts[i] as (typeof parts)[number];
          const out = tensorView(outs.buf, outs.at[i] as number, [c.M, p.N], 'f32', 'qkv'[i] as string);
          const w = own(tensorFromData(ctx, p.w, [p.N, c.K], c.w[i] as DType, `w_${'qkv'[i]}`));
          if (!p.r) return { w, out };
          const h = tensorView(hs.buf, hs.at[i] as number, [c.M, p.r], 'f32', `h_${'qkv'[i]}`);
          const b = tensorView(bs.buf, bs.at[i] as number, [p.N, p.r], 'f32', `b_${'qkv'[i]}`);
          writeTensor(h, p.h);
          writeTensor(b, p.b);
          return { w, out, lora: { h, b, scale: p.scale } };
        };
        const tx = own(tensorFromData(ctx, x, [c.M, c.K], 'f32', 'x'));
        const freq = c.rope ? own(tensorFromData(ctx, invFreq, [c.rope.hd / 2], 'f32', 'inv_freq')) : undefined;
        const rope =
          c.rope && freq ? { invFreq: freq, headDim: c.rope.hd, T: c.rope.T, pos0: 0, scaling: 1 } : undefined;
        const d = await planQkvMatmul(
          ctx,
          tx,
          { q: projection(0), k: projection(1), v: projection(2) },
          { ...(rope ? { rope } : {}), tileMath: 'f16' },
        );
        expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
        expect(d.kernel.constants.LR_DIRECT).toBe(true);
        new StepEncoder(ctx, name).dispatch(d).submit();
        const all = await readFloat32(outs.buf);
        d.dispose();
        for (const t of owned) t.dispose();
        return { all, at: outs.at };
      });
      for (const [i, p] of parts.entries()) {
        const start = (got.at[i] as number) / 4;
        const out = got.all.subarray(start, start + c.M * p.N);
        const label = `${name} ${'qkv'[i]}`;
        if (p.zero) expectClose(ctx, label, out, p.want, 1e-11, 1e-5);
        else expectClose(ctx, label, out, p.want, 4e-3 * Math.sqrt(c.K), 2e-3);
      }
    });
  }

  // The backward's products under a loss scale S (MatmulOptions.lossScaled): dy·W in the layout of
  // dx (W stored K×N), with the LoRA term s·g·A and the accumulation into dx, the dx sum of two
  // projections (matmul_sum) and the gated MLP's backward epilogue. The true gradients are 1e-7 to
  // 1e-6, which f16 would store as subnormals with a few bits or flush; scaled by S = 2^16 they
  // stage as normal f16 values, and C / S must match the float64 product of the true gradients to
  // f16's bounds (S a power of two: the division is exact).
  const S = 2 ** 16;
  const gradients = (n: number, seed: number) => randomArray(n, seed, 1).map((v) => v * 1e-6);
  const scaled = (g: Float64Array) => g.map((v) => v * S);
  const scaledCases: { M: number; N: number; K: number; r: number; w: DType }[] = [
    { M: 33, N: 96, K: 65, r: 8, w: 'f16' },
    { M: 40, N: 64, K: 128, r: 0, w: 'q8_0' },
    { M: 7, N: 96, K: 33, r: 3, w: 'q4_0' },
  ];
  for (const [c, staging] of scaledCases.flatMap((c) => STAGINGS.map((s) => [c, s] as const))) {
    const name = `dy·W, M=${c.M} N=${c.N} K=${c.K} W:${c.w}${c.r ? ` + s·g·A r=${c.r}` : ''} += dx, gradients of 1e-6 at S = 2^16 (${staging})`;
    it(name, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const seed = 11 * c.M + c.N + c.r;
      const dy = gradients(c.M * c.K, seed);
      const w = asStored(randomArray(c.K * c.N, seed + 1, 1), c.w);
      const r = Math.max(1, c.r);
      const g = gradients(c.M * r, seed + 2);
      const la = Float64Array.from(randomArray(r * c.N, seed + 3, 0.1), (v) => Math.fround(v));
      const dx0 = gradients(c.M * c.N, seed + 4);
      const alpha2 = 2;
      let want = addRef(matmulRef(dy, w, c.M, c.K, c.N), dx0, 1);
      if (c.r) want = addRef(want, matmulRef(g, la, c.M, c.r, c.N), alpha2);
      const got = await gpuCase(ctx, name, async () => {
        const tdy = tensorFromData(ctx, scaled(dy), [c.M, c.K], 'f32', 'dy');
        // Q8_0/Q4_0 blocks run along the stored rows: W is K×N here, as the backward reads W0.
        const tw = tensorFromData(ctx, w, [c.K, c.N], c.w, 'w');
        const tg = tensorFromData(ctx, scaled(g), [c.M, r], 'f32', 'g');
        const ta = tensorFromData(ctx, la, [r, c.N], 'f32', 'lora_A');
        const tc = tensorFromData(ctx, scaled(dx0), [c.M, c.N], 'f32', 'dx');
        const opts = {
          transW: false,
          beta: 1,
          lossScaled: true,
          ...(c.r ? { lowRank: { a2: tg, b2: ta, alpha2 } } : {}),
        };
        expect(f16TileMathApplies(ctx, tw, opts)).toBe(true);
        const d = await planMatmul(ctx, tdy, tw, tc, { ...opts, tileMath: 'f16', staging });
        expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = await readFloat32(tc);
        d.dispose();
        for (const x of [tdy, tw, tg, ta, tc]) x.dispose();
        return out.map((v) => v / S);
      });
      expectClose(ctx, `${name} f16 tiles`, got, want, 4e-9 * Math.sqrt(c.K + c.r), 2e-3);
    });
  }

  it('dx of two projections and the gated MLP backward epilogue, gradients of 1e-6 at S = 2^16', async (t) => {
    const ctx = gpu();
    if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
    const [M, N, K, K3] = [33, 64, 96, 40];
    const dy = gradients(M * K, 61);
    const dy3 = gradients(M * K3, 62);
    const w = asStored(randomArray(K * N, 63, 1), 'f16');
    const w3 = asStored(randomArray(K3 * N, 64, 1), 'q8_0');
    const gate = randomArray(M * N, 65, 2);
    const up = randomArray(M * N, 66, 1);
    const sum = addRef(matmulRef(dy, w, M, K, N), matmulRef(dy3, w3, M, K3, N), 1);
    const got = await gpuCase(ctx, 'f16 dx sum + silu·mul backward', async () => {
      const tdy = tensorFromData(ctx, scaled(dy), [M, K], 'f32', 'dy');
      const tdy3 = tensorFromData(ctx, scaled(dy3), [M, K3], 'f32', 'dy3');
      const tw = tensorFromData(ctx, w, [K, N], 'f16', 'w');
      const tw3 = tensorFromData(ctx, w3, [K3, N], 'q8_0', 'w3');
      const tg = tensorFromData(ctx, gate, [M, N], 'f32', 'gate');
      const tu = tensorFromData(ctx, up, [M, N], 'f32', 'up');
      const [tsum, tdg, tdu] = ['sum', 'dgate', 'dup'].map((l) => createTensor(ctx, [M, N], 'f32', l)) as [
        Tensor,
        Tensor,
        Tensor,
      ];
      const extra = { a: tdy3, w: tw3 };
      const d1 = await planMatmul(ctx, tdy, tw, tsum, { transW: false, extra, lossScaled: true, tileMath: 'f16' });
      const d2 = await planMatmul(ctx, tdy, tw, tdg, {
        transW: false,
        activationBackward: { kind: 'silu_mul', gate: tg, up: tu, dup: tdu },
        lossScaled: true,
        tileMath: 'f16',
      });
      for (const d of [d1, d2]) expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
      new StepEncoder(ctx, 'f16 backward').dispatch(d1, d2).submit();
      const out = { sum: await readFloat32(tsum), dgate: await readFloat32(tdg), dup: await readFloat32(tdu) };
      for (const x of [d1, d2, tdy, tdy3, tw, tw3, tg, tu, tsum, tdg, tdu]) x.dispose();
      return out;
    });
    const unscale = (x: Float32Array) => x.map((v) => v / S);
    expectClose(ctx, 'f16 dx sum', unscale(got.sum), sum, 4e-9 * Math.sqrt(K + K3), 2e-3);
    // silu·mul's backward of dy·W alone (no `extra` in that dispatch).
    const single = siluMulBackwardRef(gate, up, matmulRef(dy, w, M, K, N));
    expectClose(ctx, 'f16 dgate', unscale(got.dgate), single.dgate, 8e-9 * Math.sqrt(K), 2e-3);
    expectClose(ctx, 'f16 dup', unscale(got.dup), single.dup, 8e-9 * Math.sqrt(K), 2e-3);
  });

  // The backward's prologues with f16 tiles under a loss scale: the norm's backward (matmul_norm_bwd,
  // also storing ∂L/∂mid in f32), the gated MLP's (matmul_glu_bwd) and the loss's dz
  // (matmul_dlogits), each against the same dispatch with f32 tiles (which matmul.test.ts holds to
  // the float64 references), on gradients of S·1e-6 (S = 2^16): within f16's rounding of the staged
  // operands, 4e-3 of the largest value, and ∂L/∂mid (formed in f32 before it is staged) bit for bit.
  it('the norm, gated MLP and loss prologues, against f32 tiles, gradients of 1e-6 at S = 2^16', async (t) => {
    const ctx = gpu();
    if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
    const [M, N, K, V] = [33, 64, 96, 72];
    await gpuCase(ctx, 'f16 backward prologues', async () => {
      const f32 = (data: ArrayLike<number>, shape: number[], label: string) =>
        tensorFromData(ctx, data, shape, 'f32', label);
      const grad = (n: number, seed: number) => scaled(gradients(n, seed));
      const w = tensorFromData(ctx, asStored(randomArray(K * N, 71, 1), 'f16'), [K, N], 'f16', 'w');
      const w3 = tensorFromData(ctx, asStored(randomArray(K * N, 72, 1), 'q8_0'), [K, N], 'q8_0', 'w3');
      const e = tensorFromData(ctx, asStored(randomArray(V * N, 73, 1), 'f16'), [V, N], 'f16', 'e');
      const made = [w, w3, e];
      const keep = <T extends Tensor>(x: T) => {
        made.push(x);
        return x;
      };
      const dOut = keep(f32(grad(M * K, 74), [M, K], 'd_out'));
      const nb = {
        dn: keep(f32(grad(M * K, 75), [M, K], 'dn')),
        x: keep(f32(randomArray(M * K, 76, 1), [M, K], 'mid')),
        w: keep(
          f32(
            randomArray(K, 77, 1).map((v) => 1 + 0.5 * v),
            [K],
            'gain',
          ),
        ),
        rstd: keep(
          f32(
            randomArray(M, 78, 0.5).map((v) => 1 + v),
            [M],
            'rstd',
          ),
        ),
      };
      const gb = {
        gate: keep(f32(randomArray(M * K, 79, 2), [M, K], 'gate')),
        up: keep(f32(randomArray(M * K, 80, 1), [M, K], 'up')),
        w3,
      };
      const labels = keep(
        tensorFromData(
          ctx,
          Array.from({ length: M }, (_, i) => (i % 5 === 0 ? -100 : (i * 7) % V)),
          [M],
          'i32',
          'labels',
        ),
      );
      const lse = keep(
        f32(
          randomArray(M, 81, 0.5).map((v) => 4 + v),
          [M],
          'lse',
        ),
      );
      const coef = keep(f32([0, M, S / 27], [3], 'coef'));
      const logits = keep(f32(randomArray(M * V, 82, 2), [M, V], 'logits'));
      const run = async (tiles: 'f16' | 'f32') => {
        const o = tiles === 'f16' ? ({ tileMath: 'f16', lossScaled: true } as const) : {};
        const [c1, c2, c3, mid] = [
          [M, N],
          [M, N],
          [M, N],
          [M, K],
        ].map((shape, i) => keep(createTensor(ctx, shape, 'f32', `${tiles}.out${i}`))) as [
          Tensor,
          Tensor,
          Tensor,
          Tensor,
        ];
        const plans = [
          await planMatmul(ctx, dOut, w, c1, { transW: false, normBackward: { ...nb, dMid: mid }, ...o }),
          await planMatmul(ctx, dOut, w, c2, { transW: false, gluBackward: gb, ...o }),
          await planMatmul(ctx, logits, e, c3, {
            transW: false,
            dlogits: { labels, lse, coef, start: 0, vocab: V },
            ...o,
          }),
        ];
        for (const d of plans) expect(d.kernel.spec.file.includes('tile_f16.wgsl')).toBe(tiles === 'f16');
        new StepEncoder(ctx, `prologues ${tiles}`).dispatch(...plans).submit();
        const out = await Promise.all([c1, c2, c3, mid].map((x) => readFloat32(x)));
        for (const d of plans) d.dispose();
        return out;
      };
      const [a, b] = [await run('f16'), await run('f32')];
      const what = ['norm backward', 'gated MLP backward', "loss's dz"];
      for (let i = 0; i < 3; i++) {
        const want = b[i] as Float32Array;
        const largest = Math.max(...want.map(Math.abs));
        expectClose(ctx, `${what[i]} f16 vs f32 tiles`, a[i] as Float32Array, want, 4e-3 * largest, 0);
      }
      expect([...new Uint32Array((a[3] as Float32Array).buffer)]).toEqual([
        ...new Uint32Array((b[3] as Float32Array).buffer),
      ]);
      for (const x of made) x.dispose();
    });
  });

  it('is asked for only where it is safe, and refused without shader-f16', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'f16 tile math applies', async () => {
      const w16 = createTensor(ctx, [8, 8], 'f16', 'w16');
      const w32 = createTensor(ctx, [8, 8], 'f32', 'w32');
      const a = createTensor(ctx, [8, 8], 'f32', 'a');
      const b = createTensor(ctx, [8, 8], 'f32', 'b');
      const c = createTensor(ctx, [8, 8], 'f32', 'c');
      expect(f16TileMathApplies(ctx, w16)).toBe(ctx.features.shaderF16);
      expect(f16TileMathApplies(ctx, w32)).toBe(false);
      expect(f16TileMathApplies(ctx, w16, { transW: false })).toBe(false);
      expect(f16TileMathApplies(ctx, w16, { lowRank: { a2: a, b2: b, alpha2: 1 } })).toBe(ctx.features.shaderF16);
      expect(f16TileMathApplies(ctx, w16, { extra: { a, w: w16 } })).toBe(false);
      expect(f16TileMathApplies(ctx, w16, { glu: { w: w32, up: b, act: c } })).toBe(false);
      // Under a loss scale the backward's products take them too, where every weight is below f32.
      expect(f16TileMathApplies(ctx, w16, { transW: false, lossScaled: true })).toBe(ctx.features.shaderF16);
      expect(f16TileMathApplies(ctx, w16, { extra: { a, w: w16 }, lossScaled: true })).toBe(ctx.features.shaderF16);
      expect(f16TileMathApplies(ctx, w16, { extra: { a, w: w32 }, lossScaled: true })).toBe(false);
      expect(f16TileMathApplies(ctx, w32, { transW: false, lossScaled: true })).toBe(false);
      if (!ctx.features.shaderF16) {
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16' })).rejects.toThrow(/shader-f16/);
      } else {
        // Where it does not apply, asking is an error rather than a silent f16 gradient.
        await expect(planMatmul(ctx, a, w32, c, { tileMath: 'f16' })).rejects.toThrow(/f16TileMathApplies/);
        const extra = { a, w: w16 };
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16', extra })).rejects.toThrow(/f16TileMathApplies/);
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16', transW: false })).rejects.toThrow(
          /f16TileMathApplies/,
        );
        // q, k and v in one dispatch take f16 tiles only where every weight is stored below f32.
        const x9 = createTensor(ctx, [9, 8], 'f32', 'x9');
        const qkv = createTensor(ctx, [9 * 24], 'f32', 'qkv');
        const out = (i: number) => tensorView(qkv, i * 9 * 8 * 4, [9, 8], 'f32', `out${i}`);
        const projections = { q: { w: w16, out: out(0) }, k: { w: w32, out: out(1) }, v: { w: w16, out: out(2) } };
        await expect(planQkvMatmul(ctx, x9, projections, { tileMath: 'f16' })).rejects.toThrow(/f16TileMathApplies/);
        x9.dispose();
        qkv.dispose();
      }
      for (const x of [w16, w32, a, b, c]) x.dispose();
    });
  });
});

// C = x·Wᵀ + bias for M ≤ 4 (the decode step's shape): the split-K kernel's partial sums meet in
// matvec_reduce, on the adapter's build and on the workgroup-memory tree.
describe('split-K matvec on both reduction builds', () => {
  const shapes = [
    { M: 1, N: 65, K: 1031, w: 'f16' as DType },
    { M: 4, N: 63, K: 256, w: 'q8_0' as DType },
  ];
  for (const path of paths) {
    for (const c of shapes) {
      const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w} (${path.name})`;
      it(name, async (t) => {
        const ctx = path.gpu(t);
        const seed = c.M + c.N + c.K;
        const a = randomArray(c.M * c.K, seed, 1);
        const w = asStored(randomArray(c.N * c.K, seed + 1, 1), c.w);
        const bias = randomArray(c.N, seed + 2, 1);
        const want = matmulRef(a, w, c.M, c.K, c.N, { transB: true }).map((v, i) => v + (bias[i % c.N] as number));
        const got = await gpuCase(ctx, name, async () => {
          const ta = tensorFromData(ctx, a, [c.M, c.K], 'f32', 'a');
          const tw = tensorFromData(ctx, w, [c.N, c.K], c.w, 'w');
          const tb = tensorFromData(ctx, bias, [c.N], 'f32', 'bias');
          const tc = createTensor(ctx, [c.M, c.N], 'f32', 'c');
          const d = await planMatmul(ctx, ta, tw, tc, { bias: tb, matvecVariant: 'split-k' });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = await readFloat32(tc);
          d.dispose();
          for (const x of [ta, tw, tb, tc]) x.dispose();
          return out;
        });
        expectClose(ctx, name, got, want, 2e-5 * Math.sqrt(c.K), 1e-5);
      });
    }
  }
});
