// RMSNorm (shaders/rmsnorm.wgsl), forward and backward, against the float64 reference: packed
// rows of awkward lengths (every work split: one invocation per row, the adapter's choice on CPU
// adapters; and forced trees, short rows several to a workgroup and long rows one per workgroup),
// Qwen3's per-head q_norm/k_norm reading from and writing into a fused qkv buffer through a row
// stride and offset; and the norm that also computes two projections' LoRA h (rmsnorm_fwd_lora).
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { matmulRef } from '../ref/matmul.js';
import { rmsnormBackwardRef, rmsnormForwardRef } from '../ref/rmsnorm.js';
import {
  createTensor,
  readFloat32,
  ShapeError,
  StepEncoder,
  type Tensor,
  TensorArena,
  tensorFromData,
  writeTensor,
} from '../src/index.js';
import { type NormSplit, planRmsNormBackward, planRmsNormForward, type RmsNormLoraH } from '../src/kernels/rmsnorm.js';
import { expectClose, gpuCase, useReductionPaths } from './gpu.js';

const paths = useReductionPaths();

interface Case {
  rows: number;
  d: number;
  eps: number;
  accumulate: boolean;
  /** Forced work split; default the adapter's. */
  split?: NormSplit;
  /** Also copy x into xCopy (rmsnorm_fwd_copy: the start of a residual add). */
  copy?: boolean;
}

const cases: Case[] = [
  { rows: 1, d: 1, eps: 1e-5, accumulate: false },
  { rows: 7, d: 12, eps: 1e-6, accumulate: true, split: 'tree', copy: true },
  { rows: 65, d: 63, eps: 1e-5, accumulate: false, copy: true },
  { rows: 257, d: 64, eps: 1e-6, accumulate: true, split: 'tree' },
  { rows: 7, d: 65, eps: 1e-5, accumulate: false, split: 'rows' },
  { rows: 65, d: 257, eps: 1e-6, accumulate: true, split: 'tree' },
  { rows: 1, d: 257, eps: 1e-5, accumulate: false },
  { rows: 3, d: 8192, eps: 1e-5, accumulate: true, split: 'tree' },
  { rows: 257, d: 576, eps: 1e-5, accumulate: true, split: 'rows', copy: true },
];

const name = (c: Case) =>
  `rows=${c.rows} d=${c.d} eps=${c.eps}${c.accumulate ? ' dx+=' : ''}${c.split ? ` ${c.split}` : ''}${c.copy ? ' +copy' : ''}`;

// f32 sums of d terms of O(1) values.
const tol = (d: number) => 2e-6 * Math.max(1, Math.sqrt(d));

for (const path of paths) {
  describe(`rmsnorm (${path.name})`, () => {
    for (const c of cases) {
      it(name(c), async (t) => {
        const ctx = path.gpu(t);
        const seed = c.rows * 131 + c.d;
        const p = {
          rows: c.rows,
          d: c.d,
          eps: c.eps,
          x: randomArray(c.rows * c.d, seed, 2),
          w: randomArray(c.d, seed + 1),
        };
        const dy = randomArray(c.rows * c.d, seed + 2);
        const prev = randomArray(c.rows * c.d, seed + 3);
        const ref = rmsnormForwardRef(p);
        const grad = rmsnormBackwardRef(p, dy);
        const got = await gpuCase(ctx, name(c), async () => {
          const x = tensorFromData(ctx, p.x, [c.rows, c.d], 'f32', 'x');
          const w = tensorFromData(ctx, p.w, [c.d], 'f32', 'w');
          const y = createTensor(ctx, [c.rows, c.d], 'f32', 'y');
          const rstd = createTensor(ctx, [c.rows], 'f32', 'rstd');
          const tdy = tensorFromData(ctx, dy, [c.rows, c.d], 'f32', 'dy');
          const dx = c.accumulate
            ? tensorFromData(ctx, prev, [c.rows, c.d], 'f32', 'dx')
            : createTensor(ctx, [c.rows, c.d], 'f32', 'dx');
          const xCopy = c.copy ? createTensor(ctx, [c.rows, c.d], 'f32', 'x_copy') : undefined;
          const fwd = await planRmsNormForward(ctx, { x, w, y, rstd, xCopy }, { eps: c.eps, split: c.split });
          const bwd = await planRmsNormBackward(
            ctx,
            { x, w, rstd, dy: tdy, dx },
            { eps: c.eps, accumulate: c.accumulate, split: c.split },
          );
          const enc = new StepEncoder(ctx, 'rmsnorm step');
          enc.dispatch(fwd, bwd);
          enc.submit();
          const out = {
            y: await readFloat32(y),
            rstd: await readFloat32(rstd),
            dx: await readFloat32(dx),
            xCopy: xCopy ? await readFloat32(xCopy) : undefined,
          };
          fwd.dispose();
          bwd.dispose();
          for (const t of [x, w, y, rstd, tdy, dx, xCopy]) t?.dispose();
          return out;
        });
        expectClose(ctx, `${name(c)} y`, got.y, ref.y, 2e-6, 1e-5);
        expectClose(ctx, `${name(c)} rstd`, got.rstd, ref.rstd, 0, 1e-5);
        if (c.copy) expect(got.xCopy, 'x copied exactly').toEqual(Float32Array.from(p.x));
        const want = c.accumulate ? grad.dx.map((v, i) => v + (prev[i] as number)) : grad.dx;
        expectClose(ctx, `${name(c)} dx`, got.dx, want, tol(c.d), 1e-5);
      });
    }

    // Qwen3: qkv [T, (nH + 2·nKV)·hd]; q_norm normalises each of the nH q heads, k_norm each of the
    // nKV k heads, reading them in place in the fused buffer. The normalised q is written packed
    // [T·nH, hd]; the normalised k back into a second fused buffer at the same offset; the
    // gradients go into the fused dqkv, whose v columns must stay untouched.
    it('per-head q_norm and k_norm inside a fused qkv buffer (T=7, nH=3, nKV=2, hd=12)', async (t) => {
      const ctx = path.gpu(t);
      const [T, nH, nKV, hd, eps] = [7, 3, 2, 12, 1e-6];
      const width = (nH + 2 * nKV) * hd;
      const qkv = randomArray(T * width, 11, 3);
      const wq = randomArray(hd, 12);
      const wk = randomArray(hd, 13);
      const dq = randomArray(T * nH * hd, 14);
      const dk = randomArray(T * width, 15); // gradient of the second fused buffer; only k is read
      const prior = randomArray(T * width, 16); // what dqkv held before
      const heads = (from: ArrayLike<number>, n: number, offset: number) => {
        const out = new Float64Array(T * n * hd);
        for (let t = 0; t < T; t++)
          for (let j = 0; j < n * hd; j++) out[t * n * hd + j] = from[t * width + offset + j] as number;
        return out;
      };
      const kOff = nH * hd;
      const refQ = { rows: T * nH, d: hd, eps, x: heads(qkv, nH, 0), w: wq };
      const refK = { rows: T * nKV, d: hd, eps, x: heads(qkv, nKV, kOff), w: wk };
      const yq = rmsnormForwardRef(refQ).y;
      const yk = rmsnormForwardRef(refK).y;
      const dxq = rmsnormBackwardRef(refQ, dq).dx;
      const dxk = rmsnormBackwardRef(refK, heads(dk, nKV, kOff)).dx;
      const wantDqkv = Float64Array.from(prior);
      for (let t = 0; t < T; t++) {
        for (let j = 0; j < nH * hd; j++) wantDqkv[t * width + j] = dxq[t * nH * hd + j] as number;
        for (let j = 0; j < nKV * hd; j++) wantDqkv[t * width + kOff + j] = dxk[t * nKV * hd + j] as number;
      }
      const got = await gpuCase(ctx, 'qk norm', async () => {
        const x = tensorFromData(ctx, qkv, [T, width], 'f32', 'qkv');
        const tq = tensorFromData(ctx, wq, [hd], 'f32', 'q_norm.weight');
        const tk = tensorFromData(ctx, wk, [hd], 'f32', 'k_norm.weight');
        const q = createTensor(ctx, [T * nH, hd], 'f32', 'q');
        const kBuf = createTensor(ctx, [T, width], 'f32', 'qkv_normed');
        const rq = createTensor(ctx, [T * nH], 'f32', 'rstd_q');
        const rk = createTensor(ctx, [T * nKV], 'f32', 'rstd_k');
        const tdq = tensorFromData(ctx, dq, [T * nH, hd], 'f32', 'dq');
        const tdk = tensorFromData(ctx, dk, [T, width], 'f32', 'dqkv_normed');
        const dqkv = tensorFromData(ctx, prior, [T, width], 'f32', 'dqkv');
        const qOpts = { eps, groups: nH, xLayout: { stride: width } };
        const kOpts = {
          eps,
          groups: nKV,
          xLayout: { stride: width, offset: kOff },
          yLayout: { stride: width, offset: kOff },
        };
        const plans = [
          await planRmsNormForward(ctx, { x, w: tq, y: q, rstd: rq }, qOpts),
          await planRmsNormForward(ctx, { x, w: tk, y: kBuf, rstd: rk }, kOpts),
          await planRmsNormBackward(ctx, { x, w: tq, rstd: rq, dy: tdq, dx: dqkv }, qOpts),
          await planRmsNormBackward(ctx, { x, w: tk, rstd: rk, dy: tdk, dx: dqkv }, kOpts),
        ];
        const enc = new StepEncoder(ctx, 'qk norm step');
        enc.dispatch(...plans);
        enc.submit();
        const out = { q: await readFloat32(q), k: await readFloat32(kBuf), dqkv: await readFloat32(dqkv) };
        for (const d of plans) d.dispose();
        for (const t of [x, tq, tk, q, kBuf, rq, rk, tdq, tdk, dqkv]) t.dispose();
        return out;
      });
      expectClose(ctx, 'q_norm y', got.q, yq, 2e-6, 1e-5);
      expectClose(ctx, 'k_norm y', heads(got.k, nKV, kOff), yk, 2e-6, 1e-5);
      expectClose(ctx, 'dqkv (q and k written, v untouched)', got.dqkv, wantDqkv, tol(hd), 1e-5);
    });

    // rmsnorm_fwd_lora: the norm and the LoRA h = y·A_mᵀ of two or three projections reading y,
    // their A places in one arena and their h in another (each after another tensor, so at non-zero
    // offsets; the h in reverse order), in every work split.
    const loraCases: { rows: number; d: number; ranks: number[]; copy: boolean; split?: NormSplit }[] = [
      { rows: 7, d: 12, ranks: [8, 8], copy: true, split: 'tree' },
      { rows: 65, d: 63, ranks: [1, 7], copy: false },
      { rows: 65, d: 576, ranks: [16, 4], copy: true, split: 'rows' },
      { rows: 3, d: 257, ranks: [64, 2], copy: true, split: 'tree' },
      { rows: 65, d: 64, ranks: [8, 3, 8], copy: true, split: 'tree' },
      { rows: 9, d: 36, ranks: [5, 16, 1], copy: false, split: 'rows' },
    ];
    for (const c of loraCases) {
      const n = `with the LoRA h of ${c.ranks.length} projections: rows=${c.rows} d=${c.d} r=${c.ranks.join(',')}${c.copy ? ' +copy' : ''}${c.split ? ` ${c.split}` : ''}`;
      it(n, async (t) => {
        const ctx = path.gpu(t);
        const p = {
          rows: c.rows,
          d: c.d,
          eps: 1e-5,
          x: randomArray(c.rows * c.d, c.d + 5, 2),
          w: randomArray(c.d, c.d + 6),
        };
        const as = c.ranks.map((R, i) => randomArray(R * c.d, R + 9 * i, 1));
        const ref = rmsnormForwardRef(p);
        const wantH = as.map((a, i) => matmulRef(ref.y, a, c.rows, c.d, c.ranks[i] as number, { transB: true }));
        const got = await gpuCase(ctx, n, async () => {
          const x = tensorFromData(ctx, p.x, [c.rows, c.d], 'f32', 'x');
          const w = tensorFromData(ctx, p.w, [c.d], 'f32', 'w');
          const y = createTensor(ctx, [c.rows, c.d], 'f32', 'y');
          const rstd = createTensor(ctx, [c.rows], 'f32', 'rstd');
          const xCopy = c.copy ? createTensor(ctx, [c.rows, c.d], 'f32', 'x_copy') : undefined;
          const arena = new TensorArena(
            ctx,
            [{ shape: [5], label: 'other' }, ...c.ranks.map((R, i) => ({ shape: [R, c.d], label: `A${i}` }))],
            'params',
          );
          const hArena = new TensorArena(
            ctx,
            [
              { shape: [3], label: 'other h' },
              ...[...c.ranks.entries()].reverse().map(([i, R]) => ({ shape: [c.rows, R], label: `h${i}` })),
            ],
            'h',
          );
          const hs = c.ranks.map((_, i) => hArena.views[c.ranks.length - i] as Tensor);
          const lora: RmsNormLoraH[] = c.ranks.map((_, i) => {
            const a = arena.views[i + 1] as Tensor;
            writeTensor(a, as[i] as Float64Array);
            return { a, h: hs[i] as Tensor };
          });
          const fwd = await planRmsNormForward(ctx, { x, w, y, rstd, xCopy, lora }, { eps: p.eps, split: c.split });
          new StepEncoder(ctx, n).dispatch(fwd).submit();
          const out = {
            y: await readFloat32(y),
            rstd: await readFloat32(rstd),
            h: await Promise.all(hs.map((h) => readFloat32(h))),
            xCopy: xCopy ? await readFloat32(xCopy) : undefined,
          };
          fwd.dispose();
          arena.dispose();
          hArena.dispose();
          for (const t of [x, w, y, rstd, xCopy]) t?.dispose();
          return out;
        });
        expectClose(ctx, `${n} y`, got.y, ref.y, 2e-6, 1e-5);
        expectClose(ctx, `${n} rstd`, got.rstd, ref.rstd, 0, 1e-5);
        for (const [i, h] of got.h.entries())
          expectClose(ctx, `${n} h${i}`, h, wantH[i] as Float64Array, 3e-5 * Math.sqrt(c.d), 1e-5);
        if (c.copy) expect(got.xCopy, 'x copied exactly').toEqual(Float32Array.from(p.x));
      });
    }

    it('refuses LoRA h that are not disjoint places of one buffer, A apart, or four modules', async (t) => {
      const ctx = path.gpu(t);
      await gpuCase(ctx, 'rmsnorm lora refusals', async () => {
        const [rows, d] = [5, 8];
        const x = createTensor(ctx, [rows, d], 'f32', 'x');
        const w = createTensor(ctx, [d], 'f32', 'w');
        const y = createTensor(ctx, [rows, d], 'f32', 'y');
        const rstd = createTensor(ctx, [rows], 'f32', 'rstd');
        const a = new TensorArena(
          ctx,
          [0, 1, 2, 3].map((i) => ({ shape: [2, d], label: `A${i}` })),
          'params',
        );
        const h = new TensorArena(
          ctx,
          [0, 1, 2, 3].map((i) => ({ shape: [rows, 2], label: `h${i}` })),
          'h',
        );
        const apart = createTensor(ctx, [rows, 2], 'f32', 'h apart');
        const m = (i: number): RmsNormLoraH => ({ a: a.views[i] as Tensor, h: h.views[i] as Tensor });
        const plan = (lora: RmsNormLoraH[]) => planRmsNormForward(ctx, { x, w, y, rstd, lora }, { eps: 1e-5 });
        await expect(plan([m(0), { ...m(1), h: apart }])).rejects.toThrow(/h h0, h apart disjoint places/);
        await expect(plan([m(0), { ...m(1), h: h.views[0] as Tensor }])).rejects.toThrow(ShapeError);
        await expect(plan([m(0), m(1), m(2), m(3)])).rejects.toThrow(/two or three modules/);
        await expect(plan([m(0)])).rejects.toThrow(/two or three modules/);
        a.dispose();
        h.dispose();
        for (const t of [x, w, y, rstd, apart]) t.dispose();
      });
    });

    it('rejects operands whose shapes do not fit, naming them', async (t) => {
      const ctx = path.gpu(t);
      await gpuCase(ctx, 'rmsnorm shapes', async () => {
        const x = createTensor(ctx, [7, 12], 'f32', 'x');
        const w = createTensor(ctx, [12], 'f32', 'w');
        const y = createTensor(ctx, [7, 13], 'f32', 'y');
        const rstd = createTensor(ctx, [7], 'f32', 'rstd');
        await expect(planRmsNormForward(ctx, { x, w, y, rstd }, { eps: 1e-5 })).rejects.toThrow(ShapeError);
        await expect(planRmsNormForward(ctx, { x, w, y, rstd }, { eps: 1e-5 })).rejects.toThrow(/y y \[7, 13\]/);
        await expect(
          planRmsNormForward(ctx, { x, w, y: x, rstd }, { eps: 1e-5, groups: 2, xLayout: { stride: 12 } }),
        ).rejects.toThrow(/groups 2 must divide the 7 rows/);
        for (const t of [x, w, y, rstd]) t.dispose();
      });
    });
  });
}
