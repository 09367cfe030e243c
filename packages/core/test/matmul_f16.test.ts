// The tiled matmul with f16 tiles (shaders/tile_f16.wgsl) against the float64 reference, and the
// split-K matrix-vector kernel on both reduction builds: the matmul cases of the adapters with
// shader-f16 or other subgroup sizes (the node-lavapipe-f16 project: Mesa 25 lavapipe, where every
// pipeline of matmul.test.ts would take seconds to compile). Elsewhere the f16 cases skip.
import { describe, expect, it } from 'vitest';
import { asStored, randomArray } from '../ref/check.js';
import { addRef, matmulRef } from '../ref/matmul.js';
import {
  createTensor,
  type DType,
  f16TileMathApplies,
  planMatmul,
  readFloat32,
  StepEncoder,
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
      expect(f16TileMathApplies(ctx, w16, { lowRank: { a2: a, b2: b, alpha2: 1 } })).toBe(false);
      expect(f16TileMathApplies(ctx, w16, { extra: { a, w: w16 } })).toBe(false);
      expect(f16TileMathApplies(ctx, w16, { glu: { w: w32, up: b, act: c } })).toBe(false);
      if (!ctx.features.shaderF16) {
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16' })).rejects.toThrow(/shader-f16/);
      } else {
        // Where it does not apply, asking is an error rather than a silent f16 gradient or LoRA term.
        await expect(planMatmul(ctx, a, w32, c, { tileMath: 'f16' })).rejects.toThrow(/f16TileMathApplies/);
        const lowRank = { a2: a, b2: b, alpha2: 1 };
        await expect(planMatmul(ctx, a, w16, c, { tileMath: 'f16', lowRank })).rejects.toThrow(/f16TileMathApplies/);
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
