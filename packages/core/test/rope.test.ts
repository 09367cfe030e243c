// RoPE (shaders/rope.wgsl), forward and backward in place, against the float64 reference:
// head sizes 12 and 64, default and llama3 inverse frequencies, pos0 > 0 up to 10^5 (large
// angles), q and k adjacent in a fused qkv buffer (v must stay untouched), a row offset, an
// attention scaling other than 1, and explicit per-row positions; q and k in separate buffers
// rotated by one dispatch (`with`), against rotating each alone.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { type RopeRefInput, ropeBackwardRef, ropeForwardRef } from '../ref/rope.js';
import { createTensor, readFloat32, ShapeError, StepEncoder, tensorFromData } from '../src/index.js';
import { planRopeBackward, planRopeForward, type RopeConfig, ropeInvFreq } from '../src/kernels/rope.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

const llama3 = (headDim: number, factor: number, original: number): RopeConfig => ({
  headDim,
  ropeTheta: 500000,
  ropeScaling: {
    rope_type: 'llama3',
    factor,
    low_freq_factor: 1,
    high_freq_factor: 4,
    original_max_position_embeddings: original,
  },
});

interface Case {
  name: string;
  config: RopeConfig;
  B: number;
  T: number;
  nHeads: number;
  /** Row width of the buffer and where the rotated heads start in it. */
  width: number;
  offset: number;
  pos0: number;
  positions?: number[];
  scaling?: number;
}

const cases: Case[] = [
  {
    name: 'hd=12 default, rows=7, pos0=3',
    config: { headDim: 12, ropeTheta: 10000 },
    B: 1,
    T: 7,
    nHeads: 2,
    width: 24,
    offset: 0,
    pos0: 3,
  },
  {
    name: 'hd=64 llama3, fused qkv (2 q + 1 k heads rotated, v untouched), B=5 T=13, pos0=100',
    config: llama3(64, 32, 8192),
    B: 5,
    T: 13,
    nHeads: 3,
    width: 256,
    offset: 0,
    pos0: 100,
  },
  {
    name: 'hd=12 llama3 (all three bands), rows=257, pos0=100000, scaling 0.8',
    config: llama3(12, 4, 64),
    B: 1,
    T: 257,
    nHeads: 1,
    width: 12,
    offset: 0,
    pos0: 100000,
    scaling: 0.8,
  },
  {
    name: 'hd=64 default, k heads at column offset 64 of a fused row, explicit positions, rows=1',
    config: { headDim: 64, ropeTheta: 1e6 },
    B: 1,
    T: 1,
    nHeads: 2,
    width: 256,
    offset: 64,
    pos0: 0,
    positions: [4321],
  },
  {
    name: 'hd=12 default, packed sequences (positions restart), rows=65',
    config: { headDim: 12, ropeTheta: 10000 },
    B: 1,
    T: 65,
    nHeads: 1,
    width: 12,
    offset: 0,
    pos0: 0,
    positions: Array.from({ length: 65 }, (_, i) => (i < 40 ? i : i - 40)),
  },
];

describe('rope', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const ctx = gpu();
      const hd = c.config.headDim;
      const rows = c.B * c.T;
      const cols = c.nHeads * hd;
      const { invFreq } = ropeInvFreq(c.config);
      const x = randomArray(rows * c.width, rows + hd);
      const dy = randomArray(rows * c.width, rows + hd + 1);
      // the rotated heads, packed [rows, nHeads·hd], and the inverse
      const heads = (from: ArrayLike<number>) => {
        const out = new Float64Array(rows * cols);
        for (let r = 0; r < rows; r++)
          for (let j = 0; j < cols; j++) out[r * cols + j] = from[r * c.width + c.offset + j] as number;
        return out;
      };
      const scatter = (into: Float64Array, heads: ArrayLike<number>) => {
        const out = Float64Array.from(into);
        for (let r = 0; r < rows; r++)
          for (let j = 0; j < cols; j++) out[r * c.width + c.offset + j] = heads[r * cols + j] as number;
        return out;
      };
      const p: RopeRefInput = {
        rows,
        T: c.T,
        nHeads: c.nHeads,
        headDim: hd,
        pos0: c.pos0,
        positions: c.positions,
        invFreq,
        attentionScaling: c.scaling,
        x: heads(x),
      };
      const wantY = scatter(x, ropeForwardRef(p).y);
      const wantDx = scatter(dy, ropeBackwardRef(p, heads(dy)).dx);
      const got = await gpuCase(ctx, c.name, async () => {
        const tx = tensorFromData(ctx, x, [rows, c.width], 'f32', 'qkv');
        const tdy = tensorFromData(ctx, dy, [rows, c.width], 'f32', 'dqkv');
        const tf = tensorFromData(ctx, invFreq, [hd / 2], 'f32', 'inv_freq');
        const pos = c.positions ? tensorFromData(ctx, c.positions, [rows], 'i32', 'positions') : undefined;
        const opts = {
          nHeads: c.nHeads,
          headDim: hd,
          T: c.T,
          pos0: c.pos0,
          positions: pos,
          rowStride: c.width,
          colOffset: c.offset,
          attentionScaling: c.scaling,
        };
        const fwd = await planRopeForward(ctx, tx, tf, opts);
        const bwd = await planRopeBackward(ctx, tdy, tf, opts);
        const enc = new StepEncoder(ctx, 'rope step');
        enc.dispatch(fwd, bwd);
        enc.submit();
        const out = { y: await readFloat32(tx), dx: await readFloat32(tdy) };
        fwd.dispose();
        bwd.dispose();
        for (const t of [tx, tdy, tf, pos]) t?.dispose();
        return out;
      });
      expectClose(ctx, `${c.name} y`, got.y, wantY, 1e-6, 1e-5);
      expectClose(ctx, `${c.name} dx`, got.dx, wantDx, 1e-6, 1e-5);
    });
  }

  for (const positions of [undefined, [7, 0, 3, 100000, 2, 1, 5]]) {
    it(`q and k in separate buffers, one dispatch (\${positions ? 'explicit positions' : 'pos0 = 2, T = 7'})`, async () => {
      const ctx = gpu();
      const config: RopeConfig = { headDim: 12, ropeTheta: 10000 };
      const hd = config.headDim;
      const rows = 7;
      const [nQ, nK] = [3, 1];
      const { invFreq } = ropeInvFreq(config);
      const q = randomArray(rows * nQ * hd, 91);
      const k = randomArray(rows * nK * hd, 92);
      const ref = (x: Float64Array, nHeads: number) =>
        ropeForwardRef({ rows, T: rows, nHeads, headDim: hd, pos0: 2, positions, invFreq, attentionScaling: 0.9, x });
      const refBack = (x: Float64Array, nHeads: number) =>
        ropeBackwardRef(
          { rows, T: rows, nHeads, headDim: hd, pos0: 2, positions, invFreq, attentionScaling: 0.9, x },
          x,
        ).dx;
      const got = await gpuCase(ctx, 'rope q+k', async () => {
        const tq = tensorFromData(ctx, q, [rows, nQ * hd], 'f32', 'q');
        const tk = tensorFromData(ctx, k, [rows, nK * hd], 'f32', 'k');
        const tf = tensorFromData(ctx, invFreq, [hd / 2], 'f32', 'inv_freq');
        const pos = positions ? tensorFromData(ctx, positions, [rows], 'i32', 'positions') : undefined;
        const opts = { nHeads: nQ, headDim: hd, T: rows, pos0: 2, positions: pos, attentionScaling: 0.9 };
        const fwd = await planRopeForward(ctx, tq, tf, { ...opts, with: { x: tk, nHeads: nK } });
        const enc = new StepEncoder(ctx, 'rope q+k');
        enc.dispatch(fwd);
        enc.submit();
        const y = { q: await readFloat32(tq), k: await readFloat32(tk) };
        const bwd = await planRopeBackward(ctx, tq, tf, { ...opts, with: { x: tk, nHeads: nK } });
        const enc2 = new StepEncoder(ctx, 'rope q+k backward');
        enc2.dispatch(bwd);
        enc2.submit();
        const dx = { q: await readFloat32(tq), k: await readFloat32(tk) };
        await expect(planRopeForward(ctx, tq, tf, { ...opts, with: { x: tq, nHeads: nQ } })).rejects.toThrow(
          /must be another buffer/,
        );
        await expect(planRopeForward(ctx, tq, tf, { ...opts, with: { x: tk, nHeads: 2 } })).rejects.toThrow(
          /must be f32 \[7, 24\]/,
        );
        fwd.dispose();
        bwd.dispose();
        for (const t of [tq, tk, tf, pos]) t?.dispose();
        return { y, dx };
      });
      const yq = ref(q, nQ).y;
      const yk = ref(k, nK).y;
      expectClose(ctx, 'q', got.y.q, yq, 1e-6, 1e-5);
      expectClose(ctx, 'k', got.y.k, yk, 1e-6, 1e-5);
      // The backward of the rotation undoes it: applied to y it gives back the input.
      expectClose(ctx, 'dq', got.dx.q, refBack(Float64Array.from(got.y.q), nQ), 1e-6, 1e-5);
      expectClose(ctx, 'dk', got.dx.k, refBack(Float64Array.from(got.y.k), nK), 1e-6, 1e-5);
    });
  }

  it('decoding: rotates q in place and writes the rotated k and the v rows into a KV cache at their positions', async () => {
    const ctx = gpu();
    const config: RopeConfig = { headDim: 8, ropeTheta: 10000 };
    const hd = config.headDim;
    const [nQ, nK, rows, maxT] = [4, 2, 2, 12];
    const positions = [3, 9];
    const width = nK * hd;
    const { invFreq } = ropeInvFreq(config);
    const q = randomArray(rows * nQ * hd, 31);
    const k = randomArray(rows * width, 32);
    const v = randomArray(rows * width, 33);
    const ref = (x: Float64Array, nHeads: number) =>
      ropeForwardRef({ rows, T: rows, nHeads, headDim: hd, pos0: 0, positions, invFreq, x }).y;
    const got = await gpuCase(ctx, 'rope cache', async () => {
      const tq = tensorFromData(ctx, q, [rows, nQ * hd], 'f32', 'q');
      const tk = tensorFromData(ctx, k, [rows, width], 'f32', 'k');
      const tv = tensorFromData(ctx, v, [rows, width], 'f32', 'v');
      const kc = createTensor(ctx, [maxT, width], 'f32', 'k_cache');
      const vc = createTensor(ctx, [maxT, width], 'f32', 'v_cache');
      const tf = tensorFromData(ctx, invFreq, [hd / 2], 'f32', 'inv_freq');
      const pos = tensorFromData(ctx, positions, [rows], 'i32', 'positions');
      const d = await planRopeForward(ctx, tq, tf, {
        nHeads: nQ,
        headDim: hd,
        positions: pos,
        with: { x: tk, nHeads: nK },
        cache: { v: tv, k: kc, vCache: vc, maxRow: maxT - 1 },
      });
      new StepEncoder(ctx, 'rope cache').dispatch(d).submit();
      const out = {
        q: await readFloat32(tq),
        kc: await readFloat32(kc),
        vc: await readFloat32(vc),
        k: await readFloat32(tk),
      };
      const small = createTensor(ctx, [maxT - 1, width], 'f32', 'small cache');
      await expect(
        planRopeForward(ctx, tq, tf, {
          nHeads: nQ,
          headDim: hd,
          positions: pos,
          with: { x: tk, nHeads: nK },
          cache: { v: tv, k: small, vCache: vc, maxRow: maxT - 1 },
        }),
      ).rejects.toThrow(/k cache small cache/);
      d.dispose();
      for (const t of [tq, tk, tv, kc, vc, tf, pos, small]) t.dispose();
      return out;
    });
    expectClose(ctx, 'q', got.q, ref(q, nQ), 1e-6, 1e-5);
    const wantK = new Float64Array(maxT * width);
    const wantV = new Float64Array(maxT * width);
    const rk = ref(k, nK);
    positions.forEach((p, r) => {
      for (let j = 0; j < width; j++) {
        wantK[p * width + j] = rk[r * width + j] as number;
        wantV[p * width + j] = Math.fround(v[r * width + j] as number);
      }
    });
    expectClose(ctx, 'k cache', got.kc, wantK, 1e-6, 1e-5);
    expectClose(ctx, 'v cache', got.vc, wantV, 0, 0);
    expectClose(ctx, 'k untouched', got.k, Float32Array.from(k), 0, 0);
  });

  it('rejects heads that do not fit the row and a wrong inv_freq, naming them', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'rope shapes', async () => {
      const x = createTensor(ctx, [4, 24], 'f32', 'q');
      const f = createTensor(ctx, [6], 'f32', 'inv_freq');
      await expect(planRopeForward(ctx, x, f, { nHeads: 2, headDim: 12, colOffset: 12 })).rejects.toThrow(ShapeError);
      await expect(planRopeForward(ctx, x, f, { nHeads: 1, headDim: 24 })).rejects.toThrow(/inv_freq .* must be 12/);
      await expect(planRopeForward(ctx, x, f, { nHeads: 2, headDim: 12, T: 3 })).rejects.toThrow(/T = 3 must divide/);
      x.dispose();
      f.dispose();
    });
  });
});
