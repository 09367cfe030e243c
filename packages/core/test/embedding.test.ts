// Embedding gather (shaders/embedding.wgsl) against the float64 reference: f32 and packed f16
// tables (odd d, so halves of one u32 straddle two rows), GPT-2's position embedding with
// pos0 > 0 and with explicit positions, and out-of-range ids and positions, which must give zero
// rows and flags in the error buffer rather than out-of-bounds reads.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { embeddingForwardRef } from '../ref/embedding.js';
import {
  createTensor,
  type DType,
  readFloat32,
  readTensor,
  roundToF16,
  ShapeError,
  SplitRows,
  StepEncoder,
  type Tensor,
  tensorFromData,
} from '../src/index.js';
import {
  EMBEDDING_ID_OUT_OF_RANGE,
  EMBEDDING_POSITION_OUT_OF_RANGE,
  planEmbeddingForward,
  planEmbeddingTable,
} from '../src/kernels/embedding.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

interface Case {
  name: string;
  vocab: number;
  d: number;
  B: number;
  T: number;
  dtype: DType;
  /** Rows of the position embedding, 0 for none. */
  maxPos: number;
  pos0: number;
  positions?: number[];
  /** ids to place at the start, out of range included. */
  ids?: number[];
  /** Rows of each part when the table is split (core's table.ts). */
  split?: number[];
}

const cases: Case[] = [
  { name: 'f32 vocab=65 d=12 rows=7', vocab: 65, d: 12, B: 1, T: 7, dtype: 'f32', maxPos: 0, pos0: 0 },
  {
    name: 'f16 vocab=257 d=63 B=5 T=13 +wpe pos0=20',
    vocab: 257,
    d: 63,
    B: 5,
    T: 13,
    dtype: 'f16',
    maxPos: 40,
    pos0: 20,
  },
  { name: 'f32 vocab=7 d=257 rows=257 +wpe', vocab: 7, d: 257, B: 1, T: 257, dtype: 'f32', maxPos: 300, pos0: 0 },
  {
    name: 'f16 vocab=3 d=1 rows=65 +wpe, explicit positions',
    vocab: 3,
    d: 1,
    B: 1,
    T: 65,
    dtype: 'f16',
    maxPos: 65,
    pos0: 0,
    positions: Array.from({ length: 65 }, (_, i) => 64 - i),
  },
  {
    name: 'f32 vocab=64 d=65 rows=7: ids and positions out of range',
    vocab: 64,
    d: 65,
    B: 1,
    T: 7,
    dtype: 'f32',
    maxPos: 10,
    pos0: 0,
    ids: [-1, 64, 2147483647, -2147483648, 5, 63],
    positions: [0, 1, 2, 3, 10, 9, -1],
  },
  // A table split by rows: one dispatch per part, out-of-range ids still flagged once.
  {
    name: 'f32 vocab=64 d=65 rows=7 in parts [20, 24, 20]: ids and positions out of range',
    vocab: 64,
    d: 65,
    B: 1,
    T: 7,
    dtype: 'f32',
    maxPos: 10,
    pos0: 0,
    ids: [-1, 64, 2147483647, -2147483648, 5, 63],
    positions: [0, 1, 2, 3, 10, 9, -1],
    split: [20, 24, 20],
  },
  {
    name: 'f16 vocab=257 d=63 B=5 T=13 +wpe pos0=20 in parts [128, 128, 1]',
    vocab: 257,
    d: 63,
    B: 5,
    T: 13,
    dtype: 'f16',
    maxPos: 40,
    pos0: 20,
    ids: [0, 127, 128, 255, 256, 1],
    split: [128, 128, 1],
  },
];

describe('embedding', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const ctx = gpu();
      const rows = c.B * c.T;
      const seed = c.vocab * 31 + c.d;
      const round = (v: Float64Array) => Float64Array.from(c.dtype === 'f16' ? roundToF16(v) : Float32Array.from(v)); // as the GPU holds them
      const table = round(randomArray(c.vocab * c.d, seed));
      const wpe = c.maxPos ? round(randomArray(c.maxPos * c.d, seed + 1, 0.5)) : undefined;
      const rnd = randomArray(rows, seed + 2);
      const ids = Array.from(rnd, (v, t) => c.ids?.[t] ?? Math.floor(((v + 1) / 2) * c.vocab));
      const ref = embeddingForwardRef({
        ids,
        vocab: c.vocab,
        d: c.d,
        table,
        wpe: wpe ? { maxPos: c.maxPos, data: wpe } : undefined,
        T: c.T,
        pos0: c.pos0,
        positions: c.positions,
      });
      const got = await gpuCase(ctx, c.name, async () => {
        const parts: Tensor[] = [];
        let start = 0;
        for (const n of c.split ?? []) {
          parts.push(
            tensorFromData(ctx, table.subarray(start * c.d, (start + n) * c.d), [n, c.d], c.dtype, `wte[${start}]`),
          );
          start += n;
        }
        const t = {
          ids: tensorFromData(ctx, ids, [c.B, c.T], 'i32', 'input_ids'),
          table: c.split ? new SplitRows(parts, 'wte') : tensorFromData(ctx, table, [c.vocab, c.d], c.dtype, 'wte'),
          wpe: wpe ? tensorFromData(ctx, wpe, [c.maxPos, c.d], c.dtype, 'wpe') : undefined,
          positions: c.positions ? tensorFromData(ctx, c.positions, [rows], 'i32', 'positions') : undefined,
          out: createTensor(ctx, [rows, c.d], 'f32', 'embeds'),
          errors: createTensor(ctx, [2], 'u32', 'embedding.errors'),
        };
        const plan =
          t.table instanceof SplitRows
            ? await planEmbeddingTable(ctx, { ...t, table: t.table }, { T: c.T, pos0: c.pos0 })
            : [await planEmbeddingForward(ctx, { ...t, table: t.table }, { T: c.T, pos0: c.pos0 })];
        expect(plan.length).toBe(c.split?.length ?? 1);
        const enc = new StepEncoder(ctx, 'embedding step');
        enc.clear(t.errors).dispatch(...plan);
        enc.submit();
        const out = { out: await readFloat32(t.out), errors: [...(await readTensor(t.errors))] };
        for (const d of plan) d.dispose();
        for (const v of Object.values(t)) v?.dispose();
        return out;
      });
      // A gather and at most one f32 addition: exact up to the addition's rounding.
      expectClose(ctx, `${c.name} out`, got.out, ref.out, 0, 1e-7);
      const flags =
        (ref.badIds ? EMBEDDING_ID_OUT_OF_RANGE : 0) | (ref.badPositions ? EMBEDDING_POSITION_OUT_OF_RANGE : 0);
      expect(got.errors).toEqual([flags, ref.zeroRows]);
      if (c.ids && c.vocab === 64) expect(ref.zeroRows).toBe(6); // the case really exercises the guard
    });
  }

  it('rejects a table whose width does not match out, and a wrong wpe dtype, naming them', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'embedding shapes', async () => {
      const ids = createTensor(ctx, [7], 'i32', 'ids');
      const table = createTensor(ctx, [65, 12], 'f16', 'wte');
      const wpe = createTensor(ctx, [10, 12], 'f32', 'wpe');
      const out = createTensor(ctx, [7, 13], 'f32', 'out');
      const good = createTensor(ctx, [7, 12], 'f32', 'out');
      const errors = createTensor(ctx, [2], 'u32', 'errors');
      await expect(planEmbeddingForward(ctx, { ids, table, out, errors })).rejects.toThrow(ShapeError);
      await expect(planEmbeddingForward(ctx, { ids, table, wpe, out: good, errors })).rejects.toThrow(
        /wpe wpe f32\[10, 12\] must be f16/,
      );
      for (const t of [ids, table, wpe, out, good, errors]) t.dispose();
    });
  });
});
