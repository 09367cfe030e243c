// RoPE (shaders/rope.wgsl), forward and backward in place, against the float64 reference:
// head sizes 12 and 64, default and llama3 inverse frequencies, pos0 > 0 up to 10^5 (large
// angles), q and k adjacent in a fused qkv buffer (v must stay untouched), a row offset, an
// attention scaling other than 1, and explicit per-row positions.
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
