// LayerNorm (shaders/layernorm.wgsl), forward and backward, against the float64 reference on
// rows of awkward lengths, with and without bias, dx written and accumulated, in each work split
// (the adapter's own, and forced one-invocation-per-row and tree splits).
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { layernormBackwardRef, layernormForwardRef } from '../ref/layernorm.js';
import { createTensor, readFloat32, ShapeError, StepEncoder, tensorFromData } from '../src/index.js';
import { planLayerNormBackward, planLayerNormForward } from '../src/kernels/layernorm.js';
import type { NormSplit } from '../src/kernels/rmsnorm.js';
import { expectClose, gpuCase, useReductionPaths } from './gpu.js';

const paths = useReductionPaths();

interface Case {
  rows: number;
  d: number;
  bias: boolean;
  accumulate: boolean;
  /** Forced work split; default the adapter's. */
  split?: NormSplit;
  /** Also copy x into xCopy (layernorm_fwd_copy: the start of a residual add). */
  copy?: boolean;
}

const cases: Case[] = [
  { rows: 1, d: 1, bias: true, accumulate: false },
  { rows: 7, d: 12, bias: false, accumulate: true, split: 'tree', copy: true },
  { rows: 257, d: 63, bias: true, accumulate: false, split: 'rows', copy: true },
  { rows: 65, d: 64, bias: true, accumulate: true },
  { rows: 1, d: 65, bias: false, accumulate: false, split: 'tree' },
  { rows: 7, d: 257, bias: true, accumulate: true, split: 'tree' },
  { rows: 65, d: 768, bias: true, accumulate: false },
];

const name = (c: Case) =>
  `rows=${c.rows} d=${c.d}${c.bias ? ' +b' : ''}${c.accumulate ? ' dx+=' : ''}${c.split ? ` ${c.split}` : ''}${c.copy ? ' +copy' : ''}`;
const tol = (d: number) => 2e-6 * Math.max(1, Math.sqrt(d));
const eps = 1e-5;

for (const path of paths) {
  describe(`layernorm (${path.name})`, () => {
    for (const c of cases) {
      it(name(c), async (t) => {
        const ctx = path.gpu(t);
        const seed = c.rows * 137 + c.d;
        // an offset mean, as residual streams have
        const p = {
          rows: c.rows,
          d: c.d,
          eps,
          x: randomArray(c.rows * c.d, seed, 2).map((v) => v + 0.5),
          w: randomArray(c.d, seed + 1),
          b: c.bias ? randomArray(c.d, seed + 4) : undefined,
        };
        const dy = randomArray(c.rows * c.d, seed + 2);
        const prev = randomArray(c.rows * c.d, seed + 3);
        const ref = layernormForwardRef(p);
        const grad = layernormBackwardRef(p, dy);
        const got = await gpuCase(ctx, name(c), async () => {
          const x = tensorFromData(ctx, p.x, [c.rows, c.d], 'f32', 'x');
          const w = tensorFromData(ctx, p.w, [c.d], 'f32', 'w');
          const b = p.b ? tensorFromData(ctx, p.b, [c.d], 'f32', 'b') : undefined;
          const y = createTensor(ctx, [c.rows, c.d], 'f32', 'y');
          const mean = createTensor(ctx, [c.rows], 'f32', 'mean');
          const rstd = createTensor(ctx, [c.rows], 'f32', 'rstd');
          const tdy = tensorFromData(ctx, dy, [c.rows, c.d], 'f32', 'dy');
          const dx = c.accumulate
            ? tensorFromData(ctx, prev, [c.rows, c.d], 'f32', 'dx')
            : createTensor(ctx, [c.rows, c.d], 'f32', 'dx');
          const xCopy = c.copy ? createTensor(ctx, [c.rows, c.d], 'f32', 'x_copy') : undefined;
          const fwd = await planLayerNormForward(ctx, { x, w, b, y, mean, rstd, xCopy }, { eps, split: c.split });
          const bwd = await planLayerNormBackward(
            ctx,
            { x, w, mean, rstd, dy: tdy, dx },
            { eps, accumulate: c.accumulate, split: c.split },
          );
          const enc = new StepEncoder(ctx, 'layernorm step');
          enc.dispatch(fwd, bwd);
          enc.submit();
          const out = {
            y: await readFloat32(y),
            mean: await readFloat32(mean),
            rstd: await readFloat32(rstd),
            dx: await readFloat32(dx),
            xCopy: xCopy ? await readFloat32(xCopy) : undefined,
          };
          fwd.dispose();
          bwd.dispose();
          for (const t of [x, w, b, y, mean, rstd, tdy, dx, xCopy]) t?.dispose();
          return out;
        });
        expectClose(ctx, `${name(c)} y`, got.y, ref.y, 2e-6, 1e-5);
        expectClose(ctx, `${name(c)} mean`, got.mean, ref.mean, 1e-6, 1e-5);
        expectClose(ctx, `${name(c)} rstd`, got.rstd, ref.rstd, 0, 1e-5);
        if (c.copy) expect(got.xCopy, 'x copied exactly').toEqual(Float32Array.from(p.x));
        const want = c.accumulate ? grad.dx.map((v, i) => v + (prev[i] as number)) : grad.dx;
        expectClose(ctx, `${name(c)} dx`, got.dx, want, tol(c.d), 1e-5);
      });
    }

    it('rejects mean and rstd of different lengths, naming them', async (t) => {
      const ctx = path.gpu(t);
      await gpuCase(ctx, 'layernorm shapes', async () => {
        const x = createTensor(ctx, [7, 12], 'f32', 'x');
        const w = createTensor(ctx, [12], 'f32', 'w');
        const mean = createTensor(ctx, [6], 'f32', 'mean');
        const rstd = createTensor(ctx, [7], 'f32', 'rstd');
        await expect(planLayerNormForward(ctx, { x, w, y: x, mean, rstd }, { eps })).rejects.toThrow(ShapeError);
        await expect(planLayerNormForward(ctx, { x, w, y: x, mean, rstd }, { eps })).rejects.toThrow(
          /mean mean f32\[6\]/,
        );
        for (const t of [x, w, mean, rstd]) t.dispose();
      });
    });
  });
}
