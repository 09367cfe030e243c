// shaders/elementwise.wgsl: add_scaled, copy_rows (the KV-cache write of generation) and interleave3.
import { describe, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { addRef } from '../ref/matmul.js';
import {
  createTensor,
  planAddScaled,
  planCopyRows,
  planInterleave3,
  readFloat32,
  StepEncoder,
  type Tensor,
  tensorFromData,
  writeTensor,
} from '../src/index.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

describe('add_scaled', () => {
  for (const n of [1, 7, 65, 257, 70_001]) {
    it(`n = ${n}`, async () => {
      const ctx = gpu();
      const a = randomArray(n, n);
      const b = randomArray(n, n + 1);
      const got = await gpuCase(ctx, `add ${n}`, async () => {
        const ta = tensorFromData(ctx, a, [n], 'f32', 'a');
        const tb = tensorFromData(ctx, b, [n], 'f32', 'b');
        const out = createTensor(ctx, [n], 'f32', 'out');
        const d = await planAddScaled(ctx, ta, tb, out, -0.5);
        new StepEncoder(ctx, 'add').dispatch(d).submit();
        const r = await readFloat32(out);
        d.dispose();
        for (const t of [ta, tb, out]) t.dispose();
        return r;
      });
      expectClose(ctx, `add ${n}`, got, addRef(a, b, -0.5), 1e-6, 1e-6);
    });
  }
});

describe('copy_rows', () => {
  it('writes rows at the position the buffer holds, following it between submits', async () => {
    const ctx = gpu();
    const cols = 5;
    const maxT = 9;
    const src = randomArray(2 * 7, 3); // 2 rows of a 7-wide buffer; copy columns 1..5
    const got = await gpuCase(ctx, 'copy rows', async () => {
      const tsrc = tensorFromData(ctx, src, [2, 7], 'f32', 'src');
      const pos = tensorFromData(ctx, [3], [1], 'i32', 'pos');
      const dst = createTensor(ctx, [maxT, cols + 1], 'f32', 'cache');
      const d = await planCopyRows(
        ctx,
        tsrc,
        pos,
        dst,
        { rows: 2, cols, srcStride: 7, srcOffset: 1, dstStride: cols + 1, dstOffset: 1 },
        maxT - 2,
      );
      new StepEncoder(ctx, 'copy at 3').dispatch(d).submit();
      writeTensor(pos, [7]);
      new StepEncoder(ctx, 'copy at 7').dispatch(d).submit();
      const r = await readFloat32(dst);
      d.dispose();
      for (const t of [tsrc, pos, dst]) t.dispose();
      return r;
    });
    const want = new Float32Array(maxT * (cols + 1)); // a copy is exact in f32
    for (const base of [3, 7]) {
      for (let r = 0; r < 2; r++)
        for (let c = 0; c < cols; c++) want[(base + r) * (cols + 1) + 1 + c] = src[r * 7 + 1 + c] as number;
    }
    expectClose(ctx, 'copy rows', got, want, 0, 0);
  });
});

describe('interleave3', () => {
  for (const [rows, cols] of [
    [1, 1],
    [7, 65],
    [33, 12],
  ] as const) {
    it(`puts three [${rows}, ${cols}] buffers side by side`, async () => {
      const ctx = gpu();
      const srcs = [0, 1, 2].map((j) => randomArray(rows * cols, rows + cols + j));
      const got = await gpuCase(ctx, 'interleave3', async () => {
        const ts = srcs.map((x, j) => tensorFromData(ctx, x, [rows, cols], 'f32', `src${j}`));
        const dst = createTensor(ctx, [rows, 3 * cols], 'f32', 'dst');
        const d = await planInterleave3(ctx, ts as [Tensor, Tensor, Tensor], dst, { rows, cols });
        new StepEncoder(ctx, 'interleave3').dispatch(d).submit();
        const r = await readFloat32(dst);
        d.dispose();
        for (const t of [...ts, dst]) t.dispose();
        return r;
      });
      const want = new Float32Array(3 * rows * cols);
      for (let r = 0; r < rows; r++)
        for (let j = 0; j < 3; j++)
          for (let c = 0; c < cols; c++)
            want[r * 3 * cols + j * cols + c] = (srcs[j] as Float64Array)[r * cols + c] as number;
      expectClose(ctx, 'interleave3', got, want, 0, 0);
    });
  }
});
