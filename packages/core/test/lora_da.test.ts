// dA_i = s_i·g_iᵀ·x_i (+ beta·dA_i) of many modules in one dispatch (shaders/lora_da.wgsl), against
// the float64 reference: x, g and dA places of three arenas at the offsets a trainer's layout gives
// them, with another tensor first in each and the dA arena's other places left as they were.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { matmulRef } from '../ref/matmul.js';
import {
  LORA_DA_MAX_ROLES,
  type LoraDaModule,
  loraDaManyRefusal,
  planLoraDaMany,
  readFloat32,
  ShapeError,
  StepEncoder,
  type Tensor,
  TensorArena,
  writeTensor,
} from '../src/index.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

interface Case {
  readonly T: number;
  readonly mods: readonly { readonly N: number; readonly R: number }[];
  readonly beta: number;
}

const cases: Case[] = [
  // What a trainer defers: q and v of a few layers (N and offsets multiples of 4: whole vec4s).
  { T: 65, mods: Array.from({ length: 6 }, (_, i) => ({ N: 64, R: i % 2 ? 4 : 8 })), beta: 1 },
  // Unaligned widths (scalar loads), ranks 1..64, o's and down's wider inputs.
  {
    T: 7,
    mods: [
      { N: 63, R: 3 },
      { N: 257, R: 1 },
      { N: 20, R: 64 },
      { N: 5, R: 5 },
    ],
    beta: 0,
  },
  // More rows than one staging step, and a width past one column block.
  {
    T: 130,
    mods: [
      { N: 300, R: 16 },
      { N: 12, R: 2 },
    ],
    beta: 1,
  },
  // Many roles (the binary search over their starts), one row.
  { T: 1, mods: Array.from({ length: 41 }, (_, i) => ({ N: 4 * (1 + (i % 3)), R: 1 + (i % 5) })), beta: 1 },
];

function arenas(ctx: Parameters<typeof planLoraDaMany>[0], c: Case) {
  // Another tensor first in each arena (of other sizes), so the places sit at different offsets.
  const x = new TensorArena(
    ctx,
    [{ shape: [9], label: 'x.other' }, ...c.mods.map((m, i) => ({ shape: [c.T, m.N], label: `x${i}` }))],
    'x',
  );
  const g = new TensorArena(
    ctx,
    [{ shape: [70], label: 'g.other' }, ...c.mods.map((m, i) => ({ shape: [c.T, m.R], label: `g${i}` }))],
    'g',
  );
  const da = new TensorArena(
    ctx,
    [{ shape: [3, 5], label: 'dA.other' }, ...c.mods.map((m, i) => ({ shape: [m.R, m.N], label: `dA${i}` }))],
    'dA',
  );
  return {
    x,
    g,
    da,
    dispose: () => {
      for (const t of [x, g, da]) t.dispose();
    },
  };
}

describe('lora dA of many modules in one dispatch', () => {
  // Both work splits on any adapter: the GPUs' (V staged in workgroup memory, 64 invocations) and
  // the CPU adapters' (16, unstaged).
  for (const [c, stage] of cases.flatMap((c) => [true, false].map((stage) => [c, stage] as const))) {
    const n = `T=${c.T}, ${c.mods.length} modules (${[...new Set(c.mods.map((m) => `N=${m.N} r=${m.R}`))].slice(0, 4).join(', ')}), beta=${c.beta}, ${stage ? 'staged' : 'unstaged'}`;
    it(n, async () => {
      const ctx = gpu();
      const data = c.mods.map((m, i) => ({
        x: randomArray(c.T * m.N, 3 + i, 1),
        g: randomArray(c.T * m.R, 101 + i, 1),
        da0: randomArray(m.R * m.N, 211 + i, 1),
        scale: 0.25 + i / 8,
      }));
      const want = data.map((d, i) => {
        const m = c.mods[i] as Case['mods'][number];
        return matmulRef(d.g, d.x, m.R, c.T, m.N, { transA: true }).map(
          (v, j) => d.scale * v + c.beta * (d.da0[j] as number),
        );
      });
      const got = await gpuCase(ctx, n, async () => {
        const a = arenas(ctx, c);
        writeTensor(a.da.views[0] as Tensor, new Float32Array(15).fill(3));
        const modules: LoraDaModule[] = data.map((d, i) => {
          const x = a.x.views[i + 1] as Tensor;
          const g = a.g.views[i + 1] as Tensor;
          const da = a.da.views[i + 1] as Tensor;
          writeTensor(x, d.x);
          writeTensor(g, d.g);
          writeTensor(da, d.da0);
          return { x, g, da, scale: d.scale };
        });
        // The dispatch's order need not be the arena's: the roles go in reverse.
        const dsp = await planLoraDaMany(ctx, [...modules].reverse(), { T: c.T, beta: c.beta, label: n, stage });
        new StepEncoder(ctx, n).dispatch(dsp).submit();
        const result = await Promise.all(modules.map((m) => readFloat32(m.da)));
        const other = await readFloat32(a.da.views[0] as Tensor);
        dsp.dispose();
        a.dispose();
        return { result, other };
      });
      expect([...got.other]).toEqual(new Array(15).fill(3));
      for (const [i, g] of got.result.entries()) {
        expectClose(ctx, `${n} dA${i}`, g, want[i] as Float64Array, 3e-5 * Math.sqrt(c.T), 1e-5);
      }
    });
  }

  it('refuses modules that are not places of one buffer each, overlapping dA, too many modules, wrong shapes', async () => {
    const ctx = gpu();
    const c: Case = {
      T: 4,
      mods: [
        { N: 8, R: 2 },
        { N: 8, R: 2 },
      ],
      beta: 1,
    };
    await gpuCase(ctx, 'refusals', async () => {
      const a = arenas(ctx, c);
      const b = arenas(ctx, c);
      const mod = (i: number, from = a): LoraDaModule => ({
        x: from.x.views[i + 1] as Tensor,
        g: from.g.views[i + 1] as Tensor,
        da: from.da.views[i + 1] as Tensor,
        scale: 1,
      });
      const plan = (mods: LoraDaModule[]) => planLoraDaMany(ctx, mods, { T: c.T, beta: 1, label: 'refused' });
      try {
        await expect(plan([mod(0), { ...mod(1), x: b.x.views[2] as Tensor }])).rejects.toThrow(
          /x x1 is not in x0's buffer/,
        );
        await expect(plan([mod(0), { ...mod(1), g: b.g.views[2] as Tensor }])).rejects.toThrow(
          /g g1 is not in g0's buffer/,
        );
        await expect(plan([mod(0), { ...mod(1), da: a.da.views[1] as Tensor }])).rejects.toThrow(/dA dA0 overlaps dA0/);
        await expect(plan([mod(0), { ...mod(1), da: a.x.views[2] as Tensor }])).rejects.toThrow(
          /dA x1 is not in dA0's buffer/,
        );
        await expect(plan([{ ...mod(0), da: a.x.views[1] as Tensor }])).rejects.toThrow(/shares a buffer/);
        await expect(plan(new Array(LORA_DA_MAX_ROLES + 1).fill(mod(0)))).rejects.toThrow(/at most 256/);
        await expect(plan([{ ...mod(0), g: a.x.views[1] as Tensor }])).rejects.toThrow(ShapeError);
        await expect(plan([])).rejects.toThrow(/no modules/);
        expect(loraDaManyRefusal(ctx, [mod(0), mod(1)])).toBeUndefined();
      } finally {
        a.dispose();
        b.dispose();
      }
    });
  });
});
