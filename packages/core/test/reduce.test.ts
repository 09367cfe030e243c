// Sum and L2 norm of a flat f32 array (shaders/reduce.wgsl): two dispatches in one step, the
// result [value, finite flag, non-finite count] left on the GPU. Against float64 on awkward sizes
// (one workgroup, several, several partials per invocation of the second stage, several elements
// per invocation of the first), values spanning six orders of magnitude; NaN, ±Inf and an
// overflowing sum of squares clear the flag.
import { describe, expect, it } from 'vitest';
import { gradNormRef } from '../ref/adamw.js';
import { rng } from '../ref/check.js';
import { createTensor, type GpuContext, readFloat32, ShapeError, StepEncoder, tensorFromData } from '../src/index.js';
import { planL2Norm, planSum, REDUCE_OUT_SIZE, reducePartialsSize, reducePlan } from '../src/kernels/reduce.js';
import { expectClose, gpuCase, useReductionPaths } from './gpu.js';

const paths = useReductionPaths();
const gpu = paths[0].gpu;

/** Uniform values times 10^[-3, 3]: a norm dominated by a few entries, like real gradients. */
function wideArray(n: number, seed: number): Float32Array {
  const value = rng(seed);
  const exponent = rng(seed + 99);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (2 * value() - 1) * 10 ** (6 * exponent() - 3);
  return out;
}

async function reduce(ctx: GpuContext, data: Float32Array, mode: 'norm' | 'sum'): Promise<Float32Array> {
  const x = tensorFromData(ctx, data, [data.length], 'f32', 'x');
  const partials = createTensor(ctx, [reducePartialsSize(ctx, data.length)], 'f32', 'partials');
  const out = createTensor(ctx, [REDUCE_OUT_SIZE], 'f32', 'out');
  const dispatches = await (mode === 'norm' ? planL2Norm : planSum)(ctx, { x, partials, out });
  const enc = new StepEncoder(ctx, `${mode} step`);
  enc.dispatch(...dispatches);
  enc.submit();
  const got = await readFloat32(out);
  for (const d of dispatches) d.dispose();
  for (const t of [x, partials, out]) t.dispose();
  return got;
}

for (const path of paths) {
  describe(`norm (${path.name})`, () => {
    // On software adapters (64-wide workgroups, ≥ 64 elements per invocation, ≤ 256 groups):
    // 1, 7, 65, 257: one workgroup; 4097: two; 300_001: up to 2 partials per invocation of the
    // final stage; 1_100_003: 68 elements per invocation (a last run of 8 that is cut short).
    for (const n of [1, 7, 65, 257, 4097, 300_001, 1_100_003]) {
      it(`n=${n}`, async (t) => {
        const ctx = path.gpu(t);
        const data = wideArray(n, n);
        const want = gradNormRef(data);
        const got = await gpuCase(ctx, `norm n=${n}`, () => reduce(ctx, data, 'norm'));
        const plan = reducePlan(ctx, n);
        // f32 partial sums of squares, perThread serial terms then two trees: a few ulps at most.
        expectClose(
          ctx,
          `norm n=${n} (perThread ${plan.perThread}, ${plan.groups} groups)`,
          [got[0] as number],
          [want.norm],
          0,
          2e-6,
        );
        expect([got[1], got[2]]).toEqual([1, 0]);
      });
    }

    it('flags NaN and ±Inf, counts them and leaves them out of the norm', async (t) => {
      const ctx = path.gpu(t);
      const n = 5000;
      const data = wideArray(n, 5);
      data[0] = Number.NEGATIVE_INFINITY;
      data[1234] = Number.NaN;
      data[n - 1] = Number.POSITIVE_INFINITY;
      const want = gradNormRef(data);
      expect(want.nonFinite).toBe(3);
      const got = await gpuCase(ctx, 'norm non-finite', () => reduce(ctx, data, 'norm'));
      expectClose(ctx, 'norm of the finite entries', [got[0] as number], [want.norm], 0, 2e-6);
      expect([got[1], got[2]]).toEqual([0, 3]);
    });

    it('clears the flag when the sum of squares overflows f32', async (t) => {
      const ctx = path.gpu(t);
      const data = new Float32Array(100).fill(3e19);
      const got = await gpuCase(ctx, 'norm overflow', () => reduce(ctx, data, 'norm'));
      expect([got[1], got[2]]).toEqual([0, 0]);
    });
  });
}

for (const path of paths) {
  describe(`sum (${path.name})`, () => {
    for (const n of [1, 65, 300_001]) {
      it(`n=${n}`, async (t) => {
        const ctx = path.gpu(t);
        const data = wideArray(n, 7 * n);
        let sum = 0;
        let abs = 0;
        for (const x of data) {
          sum += x;
          abs += Math.abs(x);
        }
        const got = await gpuCase(ctx, `sum n=${n}`, () => reduce(ctx, data, 'sum'));
        // Cancellation: the bound is relative to Σ|x| (depth of the summation ~40 additions).
        expectClose(ctx, `sum n=${n}`, [got[0] as number], [sum], 40 * 2 ** -24 * abs, 0);
        expect([got[1], got[2]]).toEqual([1, 0]);
      });
    }
  });
}

describe('reduce shapes', () => {
  it('names the operands when the scratch or the result is the wrong size', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'reduce shape errors', async () => {
      const x = createTensor(ctx, [5000], 'f32', 'grads');
      const small = createTensor(ctx, [2], 'f32', 'scratch');
      const out = createTensor(ctx, [REDUCE_OUT_SIZE], 'f32', 'stats');
      const wrong = createTensor(ctx, [2], 'f32', 'stats2');
      const ids = createTensor(ctx, [5000], 'i32', 'ids');
      const need = reducePartialsSize(ctx, 5000);
      await expect(planL2Norm(ctx, { x, partials: small, out })).rejects.toThrow(ShapeError);
      await expect(planL2Norm(ctx, { x, partials: small, out })).rejects.toThrow(
        new RegExp(`partials scratch \\[2\\] has 2 elements, x grads \\[5000\\] needs ${need}`),
      );
      const partials = createTensor(ctx, [need], 'f32', 'partials');
      await expect(planSum(ctx, { x, partials, out: wrong })).rejects.toThrow(/out stats2 \[2\] must have 3 elements/);
      await expect(planL2Norm(ctx, { x: ids, partials, out })).rejects.toThrow(/x ids is i32, must be f32/);
      await expect(planL2Norm(ctx, { x, partials: x, out })).rejects.toThrow(/must not share a buffer/);
      for (const t of [x, small, out, wrong, ids, partials]) t.dispose();
    });
  });
});
