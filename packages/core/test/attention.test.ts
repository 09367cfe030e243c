// Causal attention (shaders/attention.wgsl), forward and backward, against the float64
// reference: prefill and decode (pos0 > 0), grouped kv heads, head sizes 7, 8, 12, 64 and 128, and
// q/k/v read from a contiguous buffer, a fused [q|k|v] projection output, a padded strided buffer
// and a KV cache whose unused rows hold NaN. Cases without a variant run the adapter's own choice
// (the rows kernels on CPU adapters, the tiled ones on GPUs); the others force one, so both sets
// run on every adapter.
import { describe, expect, it } from 'vitest';
import { type AttentionRefInput, attentionBackwardRef, attentionForwardRef } from '../ref/attention.js';
import { maxRelError, randomArray } from '../ref/check.js';
import { ropeBackwardRef } from '../ref/rope.js';
import {
  createTensor,
  type GpuContext,
  readFloat32,
  ShapeError,
  StepEncoder,
  type Tensor,
  tensorFromData,
  tensorView,
} from '../src/index.js';
import {
  type AttentionDims,
  type AttentionLayout,
  type AttentionVariant,
  attentionShapes,
  attentionTiles,
  attentionVariant,
  fusedQkvLayout,
  kvCacheLayout,
  planAttentionBackward,
  planAttentionForward,
} from '../src/kernels/attention.js';
import { expectClose, gpuCase, tableCases, useGpu } from './gpu.js';

// Which of the table's cases each test project runs: gpu.ts's tableCases.
const tableIt = tableCases({ splitAcrossProfiles: () => true });

const gpu = useGpu();

/**
 * contiguous: q [B·Tq, nH·hd], k and v [B·Tk, nKV·hd], separate buffers.
 * fused: one [B·T, (nH + 2·nKV)·hd] buffer (prefill only).
 * padded: q, k, v each at an odd offset in rows with an odd stride.
 * cache: q padded; k and v in [B, Tk + 3, nKV·hd] caches whose rows past Tk are NaN.
 */
type Layout = 'contiguous' | 'fused' | 'padded' | 'cache';

interface Case {
  B: number;
  Tq: number;
  Tk: number;
  pos0: number;
  nH: number;
  nKV: number;
  hd: number;
  layout: Layout;
  scale?: number;
  variant?: AttentionVariant;
  /** delta in a dispatch of its own (the plain plan) rather than computed by the dq kernel. */
  splitDelta?: boolean;
  /** dq, dk and dv as places of one buffer (in reverse order, NaN between them): the tiled
   * backward is then one dispatch. */
  arena?: boolean;
  /** q and k were rotated by RoPE (this attention scaling): dq and dk come out before it. */
  rope?: number;
}

const cases: Case[] = [
  { B: 1, Tq: 1, Tk: 1, pos0: 0, nH: 1, nKV: 1, hd: 12, layout: 'contiguous' },
  { B: 2, Tq: 7, Tk: 7, pos0: 0, nH: 4, nKV: 2, hd: 64, layout: 'fused' },
  { B: 1, Tq: 63, Tk: 63, pos0: 0, nH: 3, nKV: 1, hd: 12, layout: 'fused', variant: 'tiled' },
  { B: 2, Tq: 65, Tk: 65, pos0: 0, nH: 1, nKV: 1, hd: 64, layout: 'padded', variant: 'tiled' },
  { B: 1, Tq: 257, Tk: 257, pos0: 0, nH: 4, nKV: 2, hd: 64, layout: 'fused', variant: 'rows' },
  { B: 2, Tq: 257, Tk: 257, pos0: 0, nH: 3, nKV: 1, hd: 12, layout: 'contiguous', scale: 0.6 },
  { B: 2, Tq: 65, Tk: 65, pos0: 0, nH: 4, nKV: 2, hd: 64, layout: 'fused', variant: 'tiled', splitDelta: true },
  { B: 1, Tq: 33, Tk: 33, pos0: 0, nH: 2, nKV: 1, hd: 12, layout: 'contiguous', variant: 'rows', splitDelta: true },
  // decode one token, and a few, with a KV cache
  { B: 2, Tq: 1, Tk: 65, pos0: 64, nH: 4, nKV: 2, hd: 64, layout: 'cache', variant: 'tiled' },
  { B: 1, Tq: 7, Tk: 257, pos0: 250, nH: 3, nKV: 1, hd: 12, layout: 'cache' },
  // a chunk of a longer prompt (chunked prefill)
  { B: 2, Tq: 63, Tk: 65, pos0: 2, nH: 3, nKV: 1, hd: 64, layout: 'cache', scale: 0.5 },
  { B: 1, Tq: 65, Tk: 257, pos0: 192, nH: 1, nKV: 1, hd: 12, layout: 'padded', variant: 'tiled' },
  // the head size of most Llama and Qwen models
  { B: 1, Tq: 65, Tk: 65, pos0: 0, nH: 2, nKV: 1, hd: 128, layout: 'fused', variant: 'tiled' },
  // stories260K's heads (8 wide, 8 query heads on 4 kv heads), and a head size that is not a
  // multiple of 4 (the last vec4 of every row is partial)
  { B: 2, Tq: 33, Tk: 33, pos0: 0, nH: 8, nKV: 4, hd: 8, layout: 'contiguous', variant: 'rows' },
  { B: 1, Tq: 9, Tk: 11, pos0: 2, nH: 2, nKV: 1, hd: 7, layout: 'padded' },
  // RoPE's backward inside dq and dk: both kernel sets, stories260K's head size, 24 (three vec4s a
  // half, so a column's partner may be another invocation's), 64 and 128, a chunk at pos0 > 0 and
  // an attention scaling other than 1.
  { B: 2, Tq: 33, Tk: 33, pos0: 0, nH: 8, nKV: 4, hd: 8, layout: 'contiguous', variant: 'rows', rope: 1 },
  { B: 2, Tq: 33, Tk: 33, pos0: 0, nH: 8, nKV: 4, hd: 8, layout: 'contiguous', variant: 'tiled', rope: 1 },
  { B: 1, Tq: 65, Tk: 65, pos0: 0, nH: 4, nKV: 2, hd: 64, layout: 'fused', variant: 'tiled', rope: 1 },
  { B: 1, Tq: 33, Tk: 33, pos0: 0, nH: 2, nKV: 2, hd: 24, layout: 'contiguous', variant: 'tiled', rope: 1.1 },
  { B: 1, Tq: 33, Tk: 33, pos0: 0, nH: 2, nKV: 2, hd: 24, layout: 'contiguous', variant: 'rows', rope: 1.1 },
  { B: 2, Tq: 63, Tk: 65, pos0: 2, nH: 3, nKV: 1, hd: 64, layout: 'cache', variant: 'rows', rope: 1 },
  { B: 1, Tq: 17, Tk: 17, pos0: 0, nH: 2, nKV: 1, hd: 128, layout: 'padded', variant: 'tiled', rope: 0.9 },
  // dq, dk and dv places of one buffer, as the trainer keeps them: one dispatch on the tiled
  // kernels (key blocks and query blocks of different counts, partial blocks, GQA, RoPE, a head
  // size that is not a multiple of 4, pos0 > 0); two on the rows kernels.
  { B: 2, Tq: 65, Tk: 65, pos0: 0, nH: 4, nKV: 2, hd: 64, layout: 'fused', variant: 'tiled', arena: true },
  {
    B: 1,
    Tq: 33,
    Tk: 33,
    pos0: 0,
    nH: 6,
    nKV: 2,
    hd: 24,
    layout: 'contiguous',
    variant: 'tiled',
    rope: 1.1,
    arena: true,
  },
  { B: 2, Tq: 9, Tk: 11, pos0: 2, nH: 3, nKV: 1, hd: 7, layout: 'padded', variant: 'tiled', arena: true },
  { B: 1, Tq: 17, Tk: 17, pos0: 0, nH: 2, nKV: 1, hd: 128, layout: 'fused', variant: 'tiled', rope: 0.9, arena: true },
  { B: 2, Tq: 33, Tk: 33, pos0: 0, nH: 8, nKV: 4, hd: 8, layout: 'contiguous', variant: 'rows', rope: 1, arena: true },
  {
    B: 1,
    Tq: 65,
    Tk: 65,
    pos0: 0,
    nH: 2,
    nKV: 1,
    hd: 64,
    layout: 'fused',
    variant: 'tiled',
    arena: true,
    splitDelta: true,
  },
];

/** Llama's inverse frequencies for head size hd (θ = 10000), as f32. */
function invFreq(hd: number): Float32Array {
  return Float32Array.from({ length: hd / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / hd));
}

const caseName = (c: Case) =>
  `B=${c.B} Tq=${c.Tq} Tk=${c.Tk} pos0=${c.pos0} nH=${c.nH} nKV=${c.nKV} hd=${c.hd} ${c.layout}` +
  (c.scale === undefined ? '' : ` scale=${c.scale}`) +
  (c.variant === undefined ? '' : ` ${c.variant}`) +
  (c.splitDelta ? ' delta apart' : '') +
  (c.arena ? ' grads in one buffer' : '') +
  (c.rope === undefined ? '' : ` rope×${c.rope}`);

interface Packed {
  data: Float32Array;
  layout: AttentionLayout;
}

/** Places rows [B, rows, heads·hd] of `x` into a strided buffer of `size` elements (rest NaN
 * when `fill` is NaN, so a read of an element the kernels must not touch poisons the result). */
function place(
  x: ArrayLike<number>,
  B: number,
  rows: number,
  width: number,
  layout: AttentionLayout,
  into: Float32Array,
): void {
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < rows; t++) {
      for (let c = 0; c < width; c++) {
        into[layout.offset + b * layout.batchStride + t * layout.rowStride + c] = x[
          (b * rows + t) * width + c
        ] as number;
      }
    }
  }
}

function sizeOf(B: number, rows: number, width: number, l: AttentionLayout): number {
  return l.offset + (B - 1) * l.batchStride + (rows - 1) * l.rowStride + width;
}

function pack(c: Case, p: AttentionRefInput): { q: Packed; k: Packed; v: Packed; fused?: Float32Array } {
  const qw = c.nH * c.hd;
  const kw = c.nKV * c.hd;
  if (c.layout === 'fused') {
    const l = fusedQkvLayout({ T: c.Tq, nH: c.nH, nKV: c.nKV, hd: c.hd });
    const data = new Float32Array(c.B * c.Tq * l.q.rowStride).fill(Number.NaN);
    place(p.q, c.B, c.Tq, qw, l.q, data);
    place(p.k, c.B, c.Tk, kw, l.k, data);
    place(p.v, c.B, c.Tk, kw, l.v, data);
    return { q: { data, layout: l.q }, k: { data, layout: l.k }, v: { data, layout: l.v }, fused: data };
  }
  const build = (x: ArrayLike<number>, rows: number, width: number, l: AttentionLayout): Packed => {
    const data = new Float32Array(sizeOf(c.B, rows, width, l)).fill(Number.NaN);
    place(x, c.B, rows, width, l, data);
    return { data, layout: l };
  };
  const padded = (rows: number, width: number, offset: number): AttentionLayout => {
    const rowStride = width + 7;
    return { rowStride, offset, batchStride: rows * rowStride + 3 };
  };
  const contiguous = (rows: number, width: number): AttentionLayout => ({
    rowStride: width,
    offset: 0,
    batchStride: rows * width,
  });
  if (c.layout === 'contiguous') {
    return {
      q: build(p.q, c.Tq, qw, contiguous(c.Tq, qw)),
      k: build(p.k, c.Tk, kw, contiguous(c.Tk, kw)),
      v: build(p.v, c.Tk, kw, contiguous(c.Tk, kw)),
    };
  }
  if (c.layout === 'padded') {
    return {
      q: build(p.q, c.Tq, qw, padded(c.Tq, qw, 5)),
      k: build(p.k, c.Tk, kw, padded(c.Tk, kw, 3)),
      v: build(p.v, c.Tk, kw, padded(c.Tk, kw, 1)),
    };
  }
  const cache = kvCacheLayout({ maxT: c.Tk + 3, nKV: c.nKV, hd: c.hd });
  const full = (x: ArrayLike<number>): Packed => {
    const data = new Float32Array(c.B * cache.batchStride).fill(Number.NaN);
    place(x, c.B, c.Tk, kw, cache, data);
    return { data, layout: cache };
  };
  return { q: build(p.q, c.Tq, qw, padded(c.Tq, qw, 2)), k: full(p.k), v: full(p.v) };
}

function refInput(c: Case): { p: AttentionRefInput; dout: Float64Array } {
  const seed = c.B * 1009 + c.Tq * 101 + c.Tk * 13 + c.nH * 7 + c.hd;
  // q and k in [-1.7, 1.7): scores of standard deviation about 1 at scale 1/√hd.
  const p: AttentionRefInput = {
    B: c.B,
    Tq: c.Tq,
    Tk: c.Tk,
    pos0: c.pos0,
    nH: c.nH,
    nKV: c.nKV,
    hd: c.hd,
    scale: c.scale ?? 1 / Math.sqrt(c.hd),
    q: randomArray(c.B * c.Tq * c.nH * c.hd, seed, 1.7),
    k: randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 1, 1.7),
    v: randomArray(c.B * c.Tk * c.nKV * c.hd, seed + 2),
  };
  return { p, dout: randomArray(c.B * c.Tq * c.nH * c.hd, seed + 3) };
}

async function run(ctx: GpuContext, c: Case, p: AttentionRefInput, dout: Float64Array) {
  const packed = pack(c, p);
  const owned: Tensor[] = [];
  const upload = (data: ArrayLike<number>, label: string) => {
    const t = tensorFromData(ctx, data, [data.length], 'f32', label);
    owned.push(t);
    return t;
  };
  let q: Tensor;
  let k: Tensor;
  let v: Tensor;
  if (packed.fused) {
    q = k = v = upload(packed.fused, 'qkv');
  } else {
    q = upload(packed.q.data, 'q');
    k = upload(packed.k.data, 'k');
    v = upload(packed.v.data, 'v');
  }
  const dims: AttentionDims = {
    B: c.B,
    Tq: c.Tq,
    Tk: c.Tk,
    pos0: c.pos0,
    nH: c.nH,
    nKV: c.nKV,
    hd: c.hd,
    scale: c.scale,
    q: packed.q.layout,
    k: packed.k.layout,
    v: packed.v.layout,
  };
  const s = attentionShapes(dims);
  const make = (shape: readonly number[], label: string) => {
    const t = createTensor(ctx, shape, 'f32', label);
    owned.push(t);
    return t;
  };
  const o = make(s.o, 'o');
  const lse = make(s.lse, 'lse');
  const delta = make(s.delta, 'delta');
  let dq: Tensor;
  let dk: Tensor;
  let dv: Tensor;
  let arena: Tensor | undefined;
  if (c.arena) {
    // dv, dk, dq in that order, each 256 bytes past the one before, in a buffer of NaN: a write
    // or read at the wrong offset shows.
    const n = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
    const at = (elements: number) => Math.ceil((elements * 4) / 256) * 256 + 256;
    const dvAt = 256;
    const dkAt = dvAt + at(n(s.dk));
    const dqAt = dkAt + at(n(s.dk));
    arena = upload(new Float32Array((dqAt + at(n(s.o))) / 4).fill(Number.NaN), 'grads');
    dv = tensorView(arena, dvAt, s.dk, 'f32', 'dv');
    dk = tensorView(arena, dkAt, s.dk, 'f32', 'dk');
    dq = tensorView(arena, dqAt, s.o, 'f32', 'dq');
  } else {
    dq = make(s.o, 'dq');
    dk = make(s.dk, 'dk');
    dv = make(s.dk, 'dv');
  }
  const tdo = upload(dout, 'do');
  const variant = c.variant;
  const before = ctx.liveBytes;
  const fwd = await planAttentionForward(ctx, { q, k, v, o, lse, dims, variant });
  const bwd = await planAttentionBackward(
    ctx,
    {
      q,
      k,
      v,
      o,
      lse,
      do: tdo,
      dq,
      dk,
      dv,
      delta,
      dims,
      variant,
      ...(c.rope === undefined ? {} : { rope: { invFreq: invFreq(c.hd), scaling: c.rope } }),
    },
    'attention',
    { fuse: !c.splitDelta },
  );
  const one = c.arena && !c.splitDelta && (c.variant ?? attentionVariant(ctx)) === 'tiled';
  expect(bwd.length).toBe(c.splitDelta ? 3 : one ? 1 : 2);
  // Whatever the plans allocate for themselves (uniforms, scratch) beyond the tensors above.
  const planBytes = ctx.liveBytes - before;
  const enc = new StepEncoder(ctx, 'attention step');
  enc.dispatch(...fwd, ...bwd);
  enc.submit();
  const out = {
    o: await readFloat32(o),
    lse: await readFloat32(lse),
    delta: one ? undefined : await readFloat32(delta),
    dq: await readFloat32(dq),
    dk: await readFloat32(dk),
    dv: await readFloat32(dv),
    planBytes,
    // The arena's elements outside dq, dk and dv that are not NaN (none may be written).
    strays: arena ? strays(await readFloat32(arena), [dq, dk, dv]) : 0,
  };
  for (const d of [...fwd, ...bwd]) d.dispose();
  for (const t of owned) t.dispose();
  return out;
}

/** Elements of an arena outside its places that are not NaN. */
function strays(all: Float32Array, places: readonly Tensor[]): number {
  const inside = new Uint8Array(all.length);
  for (const t of places) inside.fill(1, t.byteOffset / 4, t.byteOffset / 4 + t.size);
  return all.filter((x, i) => !inside[i] && !Number.isNaN(x)).length;
}

describe('attention', () => {
  it('sizes its tiles from the device limits', () => {
    const ctx = gpu();
    for (const hd of [12, 64, 128, 256]) {
      const t = attentionTiles(ctx, hd);
      expect(4 * 4 * t.td).toBeGreaterThanOrEqual(hd);
      for (const [name, tile] of [
        ['fwd', t.fwd],
        ['dq', t.dq],
        ['dkv', t.dkv],
        ['bwd', t.bwd],
      ] as const) {
        expect(tile.own * t.td, `${name} hd=${hd} invocations`).toBeLessThanOrEqual(
          ctx.limits.maxComputeInvocationsPerWorkgroup,
        );
        expect(tile.own * tile.stream, `${name} hd=${hd}`).toBeGreaterThanOrEqual(1);
      }
      // The one-dispatch backward holds what dkv's kernel holds, so it gets dkv's tiles.
      expect(t.bwd).toEqual(t.dkv);
    }
  });

  for (const c of cases) {
    tableIt(caseName(c), async () => {
      const ctx = gpu();
      const { p, dout } = refInput(c);
      const ref = attentionForwardRef(p);
      const grads = attentionBackwardRef(p, dout);
      if (c.rope !== undefined) {
        // The gradients of q and k before the rotation: RoPE's backward of the reference's.
        const rope = { nHeads: 0, headDim: c.hd, invFreq: invFreq(c.hd), attentionScaling: c.rope };
        const rows = (T: number, nHeads: number, pos0: number) => ({ ...rope, rows: c.B * T, T, nHeads, pos0, x: [] });
        grads.dq = ropeBackwardRef(rows(c.Tq, c.nH, c.pos0), grads.dq).dx;
        grads.dk = ropeBackwardRef(rows(c.Tk, c.nKV, 0), grads.dk).dx;
      }
      const got = await gpuCase(ctx, caseName(c), () => run(ctx, c, p, dout));
      const n = caseName(c);
      // o is a convex combination of v rows; lse is O(log Tk). Gradients sum up to Tk (dq) or
      // group·Tq (dk, dv) terms of O(1).
      expectClose(ctx, `${n} o`, got.o, ref.o, 2e-6, 1e-5);
      expectClose(ctx, `${n} lse`, got.lse, ref.lse, 2e-6, 1e-5);
      // The one-dispatch backward forms delta where it needs it and writes none.
      if (got.delta) expectClose(ctx, `${n} delta`, got.delta, grads.delta, 1e-5, 1e-5);
      expectClose(ctx, `${n} dq`, got.dq, grads.dq, 1e-5, 1e-4);
      expectClose(ctx, `${n} dk`, got.dk, grads.dk, 1e-5, 1e-4);
      expectClose(ctx, `${n} dv`, got.dv, grads.dv, 1e-5, 1e-4);
      expect(got.strays, `${n}: elements written outside dq, dk and dv`).toBe(0);
    });
  }

  it('in one dispatch gives what the two dispatches give, to the bit', async () => {
    const ctx = gpu();
    const c: Case = {
      B: 2,
      Tq: 40,
      Tk: 40,
      pos0: 0,
      nH: 6,
      nKV: 2,
      hd: 64,
      layout: 'fused',
      variant: 'tiled',
      rope: 1,
    };
    const { p, dout } = refInput(c);
    const two = await gpuCase(ctx, 'two', () => run(ctx, c, p, dout));
    const one = await gpuCase(ctx, 'one', () => run(ctx, { ...c, arena: true }, p, dout));
    // Both form delta by the same function in the same order, and dkv's tiles are the one
    // dispatch's; dq's are where the dq kernel's tiles are the same.
    expect(Array.from(one.dk)).toEqual(Array.from(two.dk));
    expect(Array.from(one.dv)).toEqual(Array.from(two.dv));
    const t = attentionTiles(ctx, c.hd);
    if (t.dq.own === t.bwd.own && t.dq.stream === t.bwd.stream) expect(Array.from(one.dq)).toEqual(Array.from(two.dq));
    else expect(maxRelError(one.dq, two.dq)).toBeLessThan(1e-6);
  });

  it('T = 2048 with GQA: forward and backward match the reference, and no T×T buffer exists', async () => {
    const ctx = gpu();
    const c: Case = { B: 1, Tq: 2048, Tk: 2048, pos0: 0, nH: 2, nKV: 1, hd: 8, layout: 'contiguous' };
    const { p, dout } = refInput(c);
    const ref = attentionForwardRef(p);
    const grads = attentionBackwardRef(p, dout);
    const got = await gpuCase(ctx, caseName(c), () => run(ctx, c, p, dout));
    const n = caseName(c);
    expectClose(ctx, `${n} o`, got.o, ref.o, 2e-6, 1e-5);
    expectClose(ctx, `${n} lse`, got.lse, ref.lse, 2e-6, 1e-5);
    expectClose(ctx, `${n} dq`, got.dq, grads.dq, 1e-5, 1e-4);
    expectClose(ctx, `${n} dk`, got.dk, grads.dk, 1e-5, 1e-4);
    expectClose(ctx, `${n} dv`, got.dv, grads.dv, 1e-5, 1e-4);
    // One head's scores alone would be Tq·Tk·4 = 16 MiB; the plans hold a few uniforms.
    expect(got.planBytes).toBeLessThan(64 * 1024);
  });

  it('rejects bad shapes with ShapeError naming the operand', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'shape errors', async () => {
      const dims = { B: 1, Tq: 4, Tk: 4, pos0: 0, nH: 4, nKV: 2, hd: 8 };
      const t = (n: number, label: string) => createTensor(ctx, [n], 'f32', label);
      const q = t(4 * 32, 'q');
      const k = t(4 * 16, 'k');
      const v = t(4 * 16, 'v');
      const o = t(4 * 32, 'o');
      const lse = t(16, 'lse');
      const small = t(20, 'small');
      const all = [q, k, v, o, lse, small];
      try {
        const fwd = (over: object) => planAttentionForward(ctx, { q, k, v, o, lse, dims, ...over });
        await expect(fwd({ dims: { ...dims, nKV: 3 } })).rejects.toThrow(/nH = 4 .*nKV = 3/);
        await expect(fwd({ dims: { ...dims, hd: 300 } })).rejects.toThrow(ShapeError);
        await expect(fwd({ dims: { ...dims, pos0: -1 } })).rejects.toThrow(/pos0/);
        await expect(fwd({ q: small })).rejects.toThrow(/q small .*element/);
        await expect(fwd({ v: small, dims: { ...dims, v: { offset: 8, rowStride: 24 } } })).rejects.toThrow(/v small/);
        await expect(fwd({ dims: { ...dims, k: { rowStride: 8 } } })).rejects.toThrow(/k rows .*row stride of 8/);
        await expect(fwd({ lse: small })).rejects.toThrow(/lse small .*expected \[1, 4, 4\]/);
        await expect(
          planAttentionBackward(ctx, { q, k, v, o, lse, do: o, dq: q, dk: small, dv: k, delta: lse, dims }),
        ).rejects.toThrow(/dk small .*expected \[4, 16\]/);
        const rope = { invFreq: new Float32Array(6), scaling: 1 };
        const dims12 = { ...dims, hd: 12, nH: 2, nKV: 1 };
        await expect(
          planAttentionBackward(ctx, { q, k, v, o, lse, do: o, dq: q, dk: k, dv: k, delta: lse, dims: dims12, rope }),
        ).rejects.toThrow(/multiple of 8 .*hd 12/);
      } finally {
        for (const x of all) x.dispose();
      }
    });
  });
});
