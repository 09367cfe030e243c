// The tiled matmul with f16 tiles (shaders/tile_f16.wgsl) against the float64 reference, and the
// split-K matrix-vector kernel on both reduction builds: the matmul cases of the adapters with
// shader-f16 or other subgroup sizes (the node-lavapipe-f16 project: Mesa 25 lavapipe, where every
// pipeline of matmul.test.ts would take seconds to compile). Elsewhere the f16 cases skip.
import { describe, expect, it } from 'vitest';
import { asStored, randomArray } from '../ref/check.js';
import { addRef, matmulRef } from '../ref/matmul.js';
import { rmsnormForwardRef } from '../ref/rmsnorm.js';
import {
  createTensor,
  type DType,
  f16TileMathApplies,
  planMatmul,
  readFloat32,
  StepEncoder,
  type Tensor,
  tensorFromData,
} from '../src/index.js';
import { expectClose, gpuCase, useReductionPaths } from './gpu.js';

const paths = useReductionPaths();
const gpu = paths[0].gpu;

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
  for (const c of f16Cases) {
    const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w}${c.bias ? ' +bias' : ''}${c.beta ? ' +=C' : ''}`;
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
  for (const c of loraCases) {
    const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w} + LoRA r=${c.r} (B ~${c.bScale}${c.zeroW ? ', W = 0' : ''})`;
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
        const d = await planMatmul(ctx, ta, tw, tc, { lowRank, tileMath: 'f16' });
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
      if (!ctx.features.shaderF16) {
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16' })).rejects.toThrow(/shader-f16/);
      } else {
        // Where it does not apply, asking is an error rather than a silent f16 gradient.
        await expect(planMatmul(ctx, a, w32, c, { tileMath: 'f16' })).rejects.toThrow(/f16TileMathApplies/);
        const extra = { a, w: w16 };
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16', extra })).rejects.toThrow(/f16TileMathApplies/);
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
