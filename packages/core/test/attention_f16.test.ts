// The tiled attention forward with f16 tiles (tileMath 'f16': q, k and v staged in f16, products
// formed in f32; shaders/tile_f16.wgsl) against the float64 reference: on the inputs rounded to
// f16, which it must match to f32 precision (an f16·f16 product is exact in f32), and on the
// inputs themselves, where the staging's rounding of q and k moves the scores too. The cases run
// where the adapter has shader-f16 (the node-lavapipe-f16 project: Mesa 25 lavapipe) and skip
// elsewhere; the refusal without shader-f16 runs everywhere else. Then the backward: reading q, k
// and v rounded as such a forward staged them (f32 builds), and the tiled backward's own f16 build
// under a loss scale.
import { describe, expect, inject, it } from 'vitest';
import { attentionBackwardRef, attentionForwardRef } from '../ref/attention.js';
import { asStored, randomArray } from '../ref/check.js';
import {
  createTensor,
  readFloat32,
  StepEncoder,
  type Tensor,
  type TileMath,
  tensorFromData,
  tensorView,
} from '../src/index.js';
import {
  type AttentionVariant,
  attentionShapes,
  attentionTiles,
  planAttentionBackward,
  planAttentionForward,
} from '../src/kernels/attention.js';
import { expectClose, gpuCase, tableCases, useGpu } from './gpu.js';

// Which of the table's cases each test project runs: gpu.ts's tableCases.
const tableIt = tableCases();

const gpu = useGpu();

interface Case {
  B: number;
  Tq: number;
  Tk: number;
  pos0: number;
  nH: number;
  nKV: number;
  hd: number;
  /** q and k this large (default 1.7): products of up to 9e4, past f16's 65504. */
  qkScale?: number;
}

const cases: Case[] = [
  { B: 2, Tq: 65, Tk: 65, pos0: 0, nH: 4, nKV: 2, hd: 64 },
  { B: 1, Tq: 33, Tk: 33, pos0: 0, nH: 3, nKV: 1, hd: 12 },
  // a chunk of a longer sequence (pos0 > 0, Tk > Tq), Llama's head size
  { B: 2, Tq: 7, Tk: 70, pos0: 63, nH: 2, nKV: 1, hd: 128 },
  // a head size that is not a multiple of 4: the last staged vec4 of every row is partial
  { B: 1, Tq: 9, Tk: 11, pos0: 2, nH: 2, nKV: 1, hd: 7 },
  // outlier channels: q·k products that would overflow f16 (the scores stay finite in f32)
  { B: 1, Tq: 17, Tk: 17, pos0: 0, nH: 2, nKV: 1, hd: 64, qkScale: 300 },
];

describe('attention forward with f16 tiles', () => {
  for (const c of cases) {
    const name =
      `B=${c.B} Tq=${c.Tq} Tk=${c.Tk} pos0=${c.pos0} nH=${c.nH} nKV=${c.nKV} hd=${c.hd}` +
      (c.qkScale ? ` |q|,|k| to ${c.qkScale}` : '');
    tableIt(name, async (t) => {
      const ctx = gpu();
      if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
      const seed = c.B * 1009 + c.Tq * 101 + c.Tk * 13 + c.hd;
      const input = {
        ...c,
        scale: 1 / Math.sqrt(c.hd),
        q: randomArray(c.B * c.Tq * c.nH * c.hd, seed, c.qkScale ?? 1.7),
        k: randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 1, c.qkScale ?? 1.7),
        v: randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 2),
      };
      const rounded = {
        ...input,
        q: asStored(input.q, 'f16'),
        k: asStored(input.k, 'f16'),
        v: asStored(input.v, 'f16'),
      };
      const got = await gpuCase(ctx, name, async () => {
        const q = tensorFromData(ctx, input.q, [c.B * c.Tq, c.nH * c.hd], 'f32', 'q');
        const k = tensorFromData(ctx, input.k, [c.B * c.Tk, c.nKV * c.hd], 'f32', 'k');
        const v = tensorFromData(ctx, input.v, [c.B * c.Tk, c.nKV * c.hd], 'f32', 'v');
        const s = attentionShapes(c);
        const o = createTensor(ctx, s.o, 'f32', 'o');
        const lse = createTensor(ctx, s.lse, 'f32', 'lse');
        const dims = { B: c.B, Tq: c.Tq, Tk: c.Tk, pos0: c.pos0, nH: c.nH, nKV: c.nKV, hd: c.hd };
        const fwd = await planAttentionForward(ctx, { q, k, v, o, lse, dims, variant: 'tiled', tileMath: 'f16' });
        expect(fwd[0]?.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
        new StepEncoder(ctx, name).dispatch(...fwd).submit();
        const out = { o: await readFloat32(o), lse: await readFloat32(lse) };
        for (const d of fwd) d.dispose();
        for (const x of [q, k, v, o, lse]) x.dispose();
        return out;
      });
      // Measured on lavapipe: o within 3.3e-4 of the inputs' own reference, lse within 5.6e-4
      // (q and k rounded to f16); against the rounded inputs, f32 precision.
      const exact = attentionForwardRef(rounded);
      expectClose(ctx, `${name} o (inputs in f16)`, got.o, exact.o, 1e-5, 1e-5);
      expectClose(ctx, `${name} lse (inputs in f16)`, got.lse, exact.lse, 1e-5, 1e-6);
      if (c.qkScale) return; // scores of thousands: f16 rounding of q and k moves them by units
      const own = attentionForwardRef(input);
      expectClose(ctx, `${name} o`, got.o, own.o, 1e-2, 0);
      expectClose(ctx, `${name} lse`, got.lse, own.lse, 1e-2, 0);
    });
  }

  it('gets tiles of more rows from the halved staging, and is refused without shader-f16', async () => {
    const ctx = gpu();
    for (const hd of [12, 64, 128, 256]) {
      const f32 = attentionTiles(ctx, hd).fwd;
      const f16 = attentionTiles(ctx, hd, 'f16').fwd;
      expect(f16.own * f16.stream, `hd=${hd}`).toBeGreaterThanOrEqual(f32.own * f32.stream);
    }
    if (ctx.features.shaderF16) return;
    await gpuCase(ctx, 'attention f16 refused', async () => {
      const dims = { B: 1, Tq: 4, Tk: 4, pos0: 0, nH: 1, nKV: 1, hd: 8 };
      const s = attentionShapes(dims);
      const x = createTensor(ctx, s.o, 'f32', 'x');
      const o = createTensor(ctx, s.o, 'f32', 'o');
      const lse = createTensor(ctx, s.lse, 'f32', 'lse');
      const io = { q: x, k: x, v: x, o, lse, dims, tileMath: 'f16' as const };
      await expect(planAttentionForward(ctx, io)).rejects.toThrow(/shader-f16/);
      for (const t of [x, o, lse]) t.dispose();
    });
  });
});

// The backward of a forward that staged q, k and v in f16 (tileMath 'f16' in the backward's
// arguments: ROUND_F16, f32 builds, any adapter, both variants): given the unrounded q, k and v and
// the forward's o and lse, it must give the float64 gradients of the rounded inputs (the function
// the f16 forward computed) to f32 precision. The same backward without the rounding must miss
// them by more than that: the check can tell the two apart.
// f32 builds that read f16-rounded inputs: every project but node-lavapipe-f16 runs them.
describe.skipIf(inject('featureBuildsOnly') ?? false)('attention backward of an f16-staged forward', () => {
  const bwdCases: Case[] = [
    { B: 2, Tq: 33, Tk: 33, pos0: 0, nH: 4, nKV: 2, hd: 64 },
    { B: 1, Tq: 9, Tk: 11, pos0: 2, nH: 2, nKV: 1, hd: 7 },
  ];
  for (const c of bwdCases) {
    for (const variant of ['tiled', 'rows'] as const satisfies readonly AttentionVariant[]) {
      const name = `B=${c.B} Tq=${c.Tq} Tk=${c.Tk} pos0=${c.pos0} nH=${c.nH} nKV=${c.nKV} hd=${c.hd}, ${variant}`;
      tableIt(name, async () => {
        const ctx = gpu();
        const seed = c.B * 2003 + c.Tq * 17 + c.hd;
        const input = {
          ...c,
          scale: 1 / Math.sqrt(c.hd),
          q: randomArray(c.B * c.Tq * c.nH * c.hd, seed, 1.7),
          k: randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 1, 1.7),
          v: randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 2),
        };
        const rounded = {
          ...input,
          q: asStored(input.q, 'f16'),
          k: asStored(input.k, 'f16'),
          v: asStored(input.v, 'f16'),
        };
        const dout = randomArray(c.B * c.Tq * c.nH * c.hd, seed + 3);
        const fwd = attentionForwardRef(rounded);
        const want = attentionBackwardRef(rounded, dout);
        const run = (tileMath: TileMath) =>
          gpuCase(ctx, `${name} ${tileMath}`, async () => {
            const s = attentionShapes(c);
            const t = (data: ArrayLike<number>, shape: readonly number[], label: string) =>
              tensorFromData(ctx, data, shape, 'f32', label);
            const q = t(input.q, [c.B * c.Tq, c.nH * c.hd], 'q');
            const k = t(input.k, [c.B * c.Tk, c.nKV * c.hd], 'k');
            const v = t(input.v, [c.B * c.Tk, c.nKV * c.hd], 'v');
            const o = t(fwd.o, s.o, 'o');
            const lse = t(fwd.lse, s.lse, 'lse');
            const dO = t(dout, s.o, 'do');
            const dq = createTensor(ctx, s.o, 'f32', 'dq');
            const dk = createTensor(ctx, s.dk, 'f32', 'dk');
            const dv = createTensor(ctx, s.dk, 'f32', 'dv');
            const delta = createTensor(ctx, s.delta, 'f32', 'delta');
            const dims = { B: c.B, Tq: c.Tq, Tk: c.Tk, pos0: c.pos0, nH: c.nH, nKV: c.nKV, hd: c.hd };
            const io = { q, k, v, o, lse, do: dO, dq, dk, dv, delta, dims, variant, tileMath };
            const bwd = await planAttentionBackward(ctx, io);
            for (const d of bwd) expect(d.kernel.constants.ROUND_F16 ?? false).toBe(tileMath === 'f16');
            new StepEncoder(ctx, name).dispatch(...bwd).submit();
            const out = { dq: await readFloat32(dq), dk: await readFloat32(dk), dv: await readFloat32(dv) };
            for (const d of bwd) d.dispose();
            for (const x of [q, k, v, o, lse, dO, dq, dk, dv, delta]) x.dispose();
            return out;
          });
        const got = await run('f16');
        // As attention.test.ts holds the backward to the reference on its own inputs.
        expectClose(ctx, `${name} dq`, got.dq, want.dq, 1e-5, 1e-4);
        expectClose(ctx, `${name} dk`, got.dk, want.dk, 1e-5, 1e-4);
        expectClose(ctx, `${name} dv`, got.dv, want.dv, 1e-5, 1e-4);
        const unrounded = await run('f32');
        const miss = Math.max(
          ...(['dq', 'dk', 'dv'] as const).map((g) =>
            Math.max(...want[g].map((w, i) => Math.abs((unrounded[g][i] as number) - w) - (1e-5 + 1e-4 * Math.abs(w)))),
          ),
        );
        expect(miss, 'the unrounded backward should miss the rounded reference').toBeGreaterThan(0);
      });
    }
  }
});

// The tiled backward with f16 tiles under a loss scale (gradTileMath 'f16', the trainer's f16
// backward): q, k and v staged as the f16 forward rounded them (exactly), dout = S·(true gradients
// of 1e-7 to 1e-6, which f16 alone would flush or keep with a few bits) rounded to f16, products in
// f32. Divided by S, dq, dk and dv must match the float64 gradients of the rounded inputs to within
// f16's rounding of dout (2e-3 of the largest gradient), in two dispatches and in one (dq, dk and dv
// places of one buffer).
describe('attention backward with f16 tiles under a loss scale', () => {
  const S = 2 ** 16;
  const bwdCases: Case[] = [
    { B: 2, Tq: 33, Tk: 33, pos0: 0, nH: 4, nKV: 2, hd: 64 },
    { B: 1, Tq: 9, Tk: 11, pos0: 2, nH: 2, nKV: 1, hd: 7 },
  ];
  for (const c of bwdCases) {
    for (const one of [false, true]) {
      const name = `B=${c.B} Tq=${c.Tq} Tk=${c.Tk} pos0=${c.pos0} nH=${c.nH} nKV=${c.nKV} hd=${c.hd}, ${one ? 'one dispatch' : 'dq and dkv'}`;
      tableIt(name, async (t) => {
        const ctx = gpu();
        if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
        const seed = c.B * 3001 + c.Tq * 13 + c.hd;
        const rounded = {
          ...c,
          scale: 1 / Math.sqrt(c.hd),
          q: asStored(randomArray(c.B * c.Tq * c.nH * c.hd, seed, 1.7), 'f16'),
          k: asStored(randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 1, 1.7), 'f16'),
          v: asStored(randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 2), 'f16'),
        };
        const dout = randomArray(c.B * c.Tq * c.nH * c.hd, seed + 3).map((x) => x * 1e-6);
        const fwd = attentionForwardRef(rounded);
        const want = attentionBackwardRef(rounded, dout);
        const got = await gpuCase(ctx, name, async () => {
          const s = attentionShapes(c);
          const t = (data: ArrayLike<number>, shape: readonly number[], label: string) =>
            tensorFromData(ctx, data, shape, 'f32', label);
          const q = t(rounded.q, [c.B * c.Tq, c.nH * c.hd], 'q');
          const k = t(rounded.k, [c.B * c.Tk, c.nKV * c.hd], 'k');
          const v = t(rounded.v, [c.B * c.Tk, c.nKV * c.hd], 'v');
          const o = t(fwd.o, s.o, 'o');
          const lse = t(fwd.lse, s.lse, 'lse');
          const dO = t(
            dout.map((x) => x * S),
            s.o,
            'do',
          );
          const [nq, nk] = [s.o.reduce((a, b) => a * b), s.dk.reduce((a, b) => a * b)];
          // One buffer for dq, dk and dv (the one-dispatch kernel's condition) or three.
          const all = one ? createTensor(ctx, [nq + 2 * nk + 128], 'f32', 'dqkv') : undefined;
          const place = (offset: number, shape: readonly number[], label: string) =>
            all ? tensorView(all, offset * 4, shape, 'f32', label) : createTensor(ctx, shape, 'f32', label);
          const dq = place(0, s.o, 'dq');
          const dk = place(Math.ceil(nq / 64) * 64, s.dk, 'dk');
          const dv = place(Math.ceil(nq / 64) * 64 + Math.ceil(nk / 64) * 64, s.dk, 'dv');
          const delta = createTensor(ctx, s.delta, 'f32', 'delta');
          const dims = { B: c.B, Tq: c.Tq, Tk: c.Tk, pos0: c.pos0, nH: c.nH, nKV: c.nKV, hd: c.hd };
          const io = {
            ...{ q, k, v, o, lse, do: dO, dq, dk, dv, delta, dims },
            variant: 'tiled' as const,
            tileMath: 'f16' as const,
            gradTileMath: 'f16' as const,
          };
          const bwd = await planAttentionBackward(ctx, io);
          expect(bwd.length).toBe(one ? 1 : 2);
          for (const d of bwd) expect(d.kernel.spec.file).toContain('shaders/tile_f16.wgsl');
          new StepEncoder(ctx, name).dispatch(...bwd).submit();
          const unscale = (x: Float32Array) => x.map((y) => y / S);
          const out = {
            dq: unscale(await readFloat32(dq)),
            dk: unscale(await readFloat32(dk)),
            dv: unscale(await readFloat32(dv)),
          };
          for (const d of bwd) d.dispose();
          for (const x of [q, k, v, o, lse, dO, delta, ...(all ? [all] : [dq, dk, dv])]) x.dispose();
          return out;
        });
        for (const g of ['dq', 'dk', 'dv'] as const) {
          const largest = Math.max(...want[g].map(Math.abs));
          expectClose(ctx, `${name} ${g}`, got[g], want[g], 2e-3 * largest, 0);
        }
      });
    }
  }

  it('is refused without an f16-staged forward', async (t) => {
    const ctx = gpu();
    if (!ctx.features.shaderF16) t.skip('no shader-f16 on this adapter');
    await gpuCase(ctx, 'f16 backward refusal', async () => {
      const c = { B: 1, Tq: 4, Tk: 4, pos0: 0, nH: 1, nKV: 1, hd: 8 };
      const s = attentionShapes(c);
      const x = createTensor(ctx, s.o, 'f32', 'x');
      const [dq, dk, dv] = ['dq', 'dk', 'dv'].map((l) => createTensor(ctx, s.o, 'f32', l)) as [Tensor, Tensor, Tensor];
      const lse = createTensor(ctx, s.lse, 'f32', 'lse');
      const delta = createTensor(ctx, s.delta, 'f32', 'delta');
      const io = { q: x, k: x, v: x, o: x, lse, do: x, dq, dk, dv, delta, dims: c, gradTileMath: 'f16' as const };
      await expect(planAttentionBackward(ctx, { ...io, variant: 'tiled' })).rejects.toThrow(/staged q, k and v in f16/);
      for (const y of [x, dq, dk, dv, lse, delta]) y.dispose();
    });
  });
});
