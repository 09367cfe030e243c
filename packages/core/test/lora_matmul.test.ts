// The fused LoRA layer (shaders/lora_matmul.wgsl + the low-rank term of shaders/matmul.wgsl),
// forward and backward, against the float64 reference; and the unfused baseline likewise. The
// layer tests run the thin kernels in the adapter's own work split; a last block runs each thin
// kernel in the other split too (tree vs serial lora_rows, staged vs direct lora_cols); then the
// multi-role dispatches (h of up to three modules reading one x; their dA; g and dB of two modules
// with B and dB in arenas) in this adapter's split.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { type LoraRefInput, loraBackwardRef, loraForwardRef } from '../ref/lora.js';
import { matmulRef } from '../ref/matmul.js';
import {
  createTensor,
  type DType,
  type GpuContext,
  isCpuAdapter,
  isQuantFormat,
  LORA_GDB_CPU_MAX_RANK,
  type LoraLayer,
  loraGdBMaxRank,
  planLoraBackward,
  planLoraBackwardUnfused,
  planLoraForward,
  planLoraForwardUnfused,
  readFloat32,
  roundThrough,
  roundToF16,
  ShapeError,
  StepEncoder,
  type Tensor,
  TensorArena,
  tensorFromData,
  writeTensor,
} from '../src/index.js';
import {
  type LoraGradModule,
  type LoraRowsSplit,
  type LoraThinKernel,
  planLoraColsMulti,
  planLoraGradGdBMany,
  planLoraGradGdBPair,
  planLoraRows,
  planLoraRowsMulti,
  planLoraWeightGrad,
} from '../src/kernels/lora_matmul.js';
import { expectClose, gpuCase, tableCases, useReductionPaths } from './gpu.js';

// Which of the table's cases each test project runs: gpu.ts's tableCases.
const tableIt = tableCases({ splitAcrossProfiles: () => true });

// lora_rows's tree split (alone, in lora_rows_multi, lora_g_db and lora_g_db_pair) adds its partial
// sums with group_sum4x4: the cases that reach it run on both builds (subgroups, trees); the rest
// on the adapter's own.
const reductionPaths = useReductionPaths();
const gpu = () => reductionPaths[0].gpu();

interface Case {
  T: number;
  inF: number;
  outF: number;
  r: number;
  w0: DType;
  bias: boolean;
  accumulate: boolean;
  /** The fused layer's thin-product kernel; both run on every adapter. */
  thin: LoraThinKernel;
  /** g and dB in two dispatches (g with `thin`'s kernel) rather than lora_g_db's one. */
  splitGdB?: boolean;
}

const TS = [1, 7, 65, 257];
const DIMS = [1, 63, 64, 65, 257];
const RANKS = [1, 8, 64];
const cases: Case[] = [];
TS.forEach((T, i) => {
  DIMS.forEach((inF, j) => {
    cases.push({
      T,
      inF,
      outF: DIMS[(i + 2 * j + 1) % DIMS.length] as number,
      r: RANKS[(i + j) % RANKS.length] as number,
      w0: (i + j) % 2 ? 'f16' : 'f32',
      bias: j % 2 === 1,
      accumulate: (i + j) % 3 === 0,
      thin: cases.length % 2 ? 'rows' : 'matmul',
      splitGdB: cases.length % 3 === 0,
    });
  });
});
cases.push({ T: 33, inF: 96, outF: 80, r: 128, w0: 'f16', bias: false, accumulate: false, thin: 'rows' });
cases.push({ T: 64, inF: 64, outF: 64, r: 16, w0: 'f32', bias: true, accumulate: true, thin: 'matmul' });
cases.push({ T: 64, inF: 64, outF: 64, r: 16, w0: 'f32', bias: true, accumulate: true, thin: 'rows', splitGdB: true });
// A quantized W0 (in a multiple of 32, the block size) in the forward x·W0ᵀ and the backward dy·W0.
cases.push({ T: 65, inF: 96, outF: 63, r: 8, w0: 'q4_0', bias: true, accumulate: false, thin: 'matmul' });
cases.push({ T: 7, inF: 64, outF: 257, r: 1, w0: 'q8_0', bias: false, accumulate: true, thin: 'rows' });
cases.push({ T: 1, inF: 32, outF: 65, r: 64, w0: 'q4_0', bias: false, accumulate: true, thin: 'rows' });
cases.push({ T: 257, inF: 128, outF: 64, r: 16, w0: 'q8_0', bias: true, accumulate: false, thin: 'matmul' });

const name = (c: Case, fused = true) =>
  `T=${c.T} in=${c.inF} out=${c.outF} r=${c.r} W0:${c.w0}${c.bias ? ' +bias' : ''}${c.accumulate ? ' accumulate' : ''}${fused ? ` thin:${c.thin}${c.splitGdB ? ' g,dB apart' : ''}` : ''}`;

function inputs(c: Case): {
  p: LoraRefInput;
  dy: Float64Array;
  prev: { dx: Float64Array; da: Float64Array; db: Float64Array };
} {
  const seed = c.T * 7919 + c.inF * 31 + c.outF * 7 + c.r;
  let w0 = randomArray(c.outF * c.inF, seed + 1, 0.5);
  if (c.w0 === 'f16') w0 = Float64Array.from(roundToF16(w0));
  if (isQuantFormat(c.w0)) w0 = Float64Array.from(roundThrough(c.w0, w0));
  const p: LoraRefInput = {
    T: c.T,
    inF: c.inF,
    outF: c.outF,
    r: c.r,
    x: randomArray(c.T * c.inF, seed),
    w0,
    a: randomArray(c.r * c.inF, seed + 2, 0.5),
    b: randomArray(c.outF * c.r, seed + 3, 0.5),
    bias: c.bias ? randomArray(c.outF, seed + 4) : undefined,
    scale: 16 / c.r,
  };
  const prev = {
    dx: randomArray(c.T * c.inF, seed + 6),
    da: randomArray(c.r * c.inF, seed + 7),
    db: randomArray(c.outF * c.r, seed + 8),
  };
  return { p, dy: randomArray(c.T * c.outF, seed + 5), prev };
}

function upload(ctx: GpuContext, c: Case, p: LoraRefInput) {
  const layer: LoraLayer = {
    w0: tensorFromData(ctx, p.w0, [c.outF, c.inF], c.w0, 'w0'),
    a: tensorFromData(ctx, p.a, [c.r, c.inF], 'f32', 'lora_A'),
    b: tensorFromData(ctx, p.b, [c.outF, c.r], 'f32', 'lora_B'),
    bias: p.bias ? tensorFromData(ctx, p.bias, [c.outF], 'f32', 'bias') : undefined,
    scale: p.scale,
  };
  const x = tensorFromData(ctx, p.x, [c.T, c.inF], 'f32', 'x');
  const dispose = () => {
    for (const t of [layer.w0, layer.a, layer.b, layer.bias, x]) t?.dispose();
  };
  return { layer, x, dispose };
}

// Error bound: K-long f32 dot products of O(1) values; the low-rank term adds an r-long one.
const tol = (c: Case, k: number) => 3e-5 * Math.sqrt(k) * Math.max(1, Math.sqrt(c.r) * (16 / c.r));

for (const fused of [true, false]) {
  describe(fused ? 'lora fused' : 'lora unfused baseline', () => {
    for (const c of cases) {
      if (!fused && c.accumulate) continue; // the baseline has no accumulate mode
      tableIt(name(c, fused), async () => {
        const ctx = gpu();
        const { p, dy, prev } = inputs(c);
        const ref = loraForwardRef(p);
        const grads = loraBackwardRef(p, dy);
        const got = await gpuCase(ctx, name(c, fused), async () => {
          const { layer, x, dispose } = upload(ctx, c, p);
          const y = createTensor(ctx, [c.T, c.outF], 'f32', 'y');
          const h = createTensor(ctx, [c.T, c.r], 'f32', 'h');
          const g = createTensor(ctx, [c.T, c.r], 'f32', 'g');
          const tdy = tensorFromData(ctx, dy, [c.T, c.outF], 'f32', 'dy');
          const init = (data: Float64Array, shape: number[], label: string) =>
            c.accumulate ? tensorFromData(ctx, data, shape, 'f32', label) : createTensor(ctx, shape, 'f32', label);
          const dx = init(prev.dx, [c.T, c.inF], 'dx');
          const da = init(prev.da, [c.r, c.inF], 'dA');
          const db = init(prev.db, [c.outF, c.r], 'dB');
          const io = { x, h, dy: tdy, g, dx, da, db };
          let release: () => void;
          const enc = new StepEncoder(ctx, 'lora step');
          if (fused) {
            const fwd = await planLoraForward(ctx, layer, { x, y, h, thin: c.thin });
            const bwd = await planLoraBackward(ctx, layer, io, {
              accumulateDx: c.accumulate,
              accumulateGrads: c.accumulate,
              thin: c.thin,
              fuse: !c.splitGdB,
              // lora_g_db at every rank here, on every adapter (CPU adapters plan it up to r 16).
              gdBMaxRank: Number.POSITIVE_INFINITY,
            });
            enc.dispatch(...fwd, ...bwd);
            release = () => {
              for (const d of [...fwd, ...bwd]) d.dispose();
            };
          } else {
            const fwd = await planLoraForwardUnfused(ctx, layer, { x, y, h });
            const bwd = await planLoraBackwardUnfused(ctx, layer, io);
            enc.dispatch(...fwd.dispatches, ...bwd.dispatches);
            release = () => {
              fwd.dispose();
              bwd.dispose();
            };
          }
          enc.submit();
          const out = {
            y: await readFloat32(y),
            h: await readFloat32(h),
            dx: await readFloat32(dx),
            da: await readFloat32(da),
            db: await readFloat32(db),
          };
          release();
          for (const t of [y, h, g, tdy, dx, da, db]) t.dispose();
          dispose();
          return out;
        });
        const acc = (want: Float64Array, before: Float64Array) =>
          c.accumulate ? want.map((v, i) => v + (before[i] as number)) : want;
        expectClose(ctx, `${name(c, fused)} h`, got.h, ref.h, tol(c, c.inF), 1e-5);
        expectClose(ctx, `${name(c, fused)} y`, got.y, ref.y, tol(c, c.inF), 1e-5);
        expectClose(ctx, `${name(c, fused)} dx`, got.dx, acc(grads.dx, prev.dx), tol(c, c.outF), 1e-5);
        expectClose(ctx, `${name(c, fused)} dA`, got.da, acc(grads.da, prev.da), tol(c, c.T * c.outF), 1e-5);
        expectClose(ctx, `${name(c, fused)} dB`, got.db, acc(grads.db, prev.db), tol(c, c.T * c.inF), 1e-5);
      });
    }
  });
}

describe("lora backward's g and dB", () => {
  it('are one dispatch up to the device rank limit and two above it', async () => {
    const ctx = gpu();
    const limit = loraGdBMaxRank(ctx);
    expect(limit).toBe(isCpuAdapter(ctx) ? LORA_GDB_CPU_MAX_RANK : Number.POSITIVE_INFINITY);
    const labels = await gpuCase(ctx, 'g and dB by rank', async () => {
      const out: Record<number, string[]> = {};
      for (const r of [LORA_GDB_CPU_MAX_RANK, LORA_GDB_CPU_MAX_RANK + 4]) {
        const T = 5;
        const d = 24;
        const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
        const layer: LoraLayer = { w0: t([d, d], 'w0'), a: t([r, d], 'a'), b: t([d, r], 'b'), scale: 1 };
        const io = {
          x: t([T, d], 'x'),
          h: t([T, r], 'h'),
          dy: t([T, d], 'dy'),
          g: t([T, r], 'g'),
          dx: t([T, d], 'dx'),
          da: t([r, d], 'da'),
          db: t([d, r], 'db'),
        };
        const plan = await planLoraBackward(ctx, layer, io, {}, 'm');
        out[r] = plan.map((p) => p.label);
        for (const p of plan) p.dispose();
        for (const x of [layer.w0, layer.a, layer.b, ...Object.values(io)]) x.dispose();
      }
      return out;
    });
    const apart = ['m.g', 'm.dB', 'm.dA', 'm.dx'];
    const inOne = ['m.g_dB', 'm.dA', 'm.dx'];
    expect(labels[LORA_GDB_CPU_MAX_RANK]).toEqual(inOne);
    expect(labels[LORA_GDB_CPU_MAX_RANK + 4]).toEqual(isCpuAdapter(ctx) ? apart : inOne);
  });
});

// Each thin kernel in both work splits, whatever the adapter picks: C = X·Aᵀ and X·B (lora_rows),
// and alpha·Uᵀ·V written R×N or N×R, with beta (lora_cols, its scalar and vec4 entry points).
describe('lora thin kernels, each work split', () => {
  const rowsCases: { M: number; K: number; R: number; transL: boolean; split: LoraRowsSplit }[] = [
    { M: 65, K: 63, R: 8, transL: true, split: 'tree' },
    { M: 7, K: 257, R: 1, transL: false, split: 'tree' },
    { M: 65, K: 63, R: 8, transL: false, split: 'serial' },
    { M: 7, K: 257, R: 7, transL: true, split: 'serial' },
  ];
  for (const c of rowsCases) {
    for (const path of c.split === 'tree' ? reductionPaths : reductionPaths.slice(0, 1)) {
      const n = `lora_rows M=${c.M} K=${c.K} R=${c.R} ${c.transL ? 'X·Lᵀ' : 'X·L'} ${c.split}${c.split === 'tree' ? ` (${path.name})` : ''}`;
      tableIt(n, async (test) => {
        const ctx = path.gpu(test);
        const x = randomArray(c.M * c.K, c.M + c.K, 1);
        const l = randomArray(c.R * c.K, c.R + 3, 1);
        const want = matmulRef(x, l, c.M, c.K, c.R, { transB: c.transL });
        const got = await gpuCase(ctx, n, async () => {
          const tx = tensorFromData(ctx, x, [c.M, c.K], 'f32', 'x');
          const tl = tensorFromData(ctx, l, c.transL ? [c.R, c.K] : [c.K, c.R], 'f32', 'l');
          const out = createTensor(ctx, [c.M, c.R], 'f32', 'out');
          const d = await planLoraRows(ctx, tx, tl, out, c, c.transL, n, { split: c.split });
          new StepEncoder(ctx, n).dispatch(d).submit();
          const result = await readFloat32(out);
          d.dispose();
          for (const t of [tx, tl, out]) t.dispose();
          return result;
        });
        expectClose(ctx, n, got, want, 3e-5 * Math.sqrt(c.K), 1e-5);
      });
    }
  }

  const colsCases: { T: number; N: number; R: number; outNR: boolean; stage: boolean }[] = [
    { T: 65, N: 63, R: 8, outNR: true, stage: true },
    { T: 65, N: 64, R: 7, outNR: false, stage: true },
    { T: 65, N: 63, R: 7, outNR: false, stage: false },
    { T: 65, N: 64, R: 8, outNR: true, stage: false },
  ];
  for (const c of colsCases) {
    const n = `lora_cols T=${c.T} N=${c.N} R=${c.R} ${c.outNR ? 'N×R' : 'R×N'} ${c.stage ? 'staged' : 'direct'}`;
    tableIt(n, async () => {
      const ctx = gpu();
      const u = randomArray(c.T * c.N, c.T + c.N, 1);
      const v = randomArray(c.T * c.R, c.R + 5, 1);
      const before = randomArray(c.N * c.R, 9, 1);
      const [alpha, beta] = [0.5, 1];
      const prod = c.outNR
        ? matmulRef(u, v, c.N, c.T, c.R, { transA: true })
        : matmulRef(v, u, c.R, c.T, c.N, { transA: true });
      const want = prod.map((x, i) => alpha * x + beta * (before[i] as number));
      const got = await gpuCase(ctx, n, async () => {
        const tu = tensorFromData(ctx, u, [c.T, c.N], 'f32', 'u');
        const tv = tensorFromData(ctx, v, [c.T, c.R], 'f32', 'v');
        const out = tensorFromData(ctx, before, c.outNR ? [c.N, c.R] : [c.R, c.N], 'f32', 'out');
        const d = await planLoraWeightGrad(ctx, tu, tv, out, c, c.outNR, alpha, beta, n, { stage: c.stage });
        new StepEncoder(ctx, n).dispatch(d).submit();
        const result = await readFloat32(out);
        d.dispose();
        for (const t of [tu, tv, out]) t.dispose();
        return result;
      });
      expectClose(ctx, n, got, want, 3e-5 * Math.sqrt(c.T), 1e-5);
    });
  }
});

// Up to three modules reading the same x in one dispatch, each with its own rank, alpha and beta:
// h_i = x·A_iᵀ (lora_rows_multi) and dA_i = alpha_i·g_iᵀ·x + beta_i·dA_i (lora_cols_multi).
describe('lora multi-role dispatches', () => {
  const multiCases: { T: number; K: number; ranks: number[] }[] = [
    { T: 65, K: 63, ranks: [8] },
    { T: 7, K: 64, ranks: [8, 1] },
    { T: 65, K: 257, ranks: [4, 7, 16] },
    { T: 1, K: 32, ranks: [64, 8, 8] },
  ];
  for (const c of multiCases) {
    const n = `T=${c.T} K=${c.K} ranks ${c.ranks.join(',')}`;
    for (const path of reductionPaths) {
      tableIt(`h of ${c.ranks.length} modules, ${n} (${path.name})`, async (test) => {
        const ctx = path.gpu(test);
        const x = randomArray(c.T * c.K, c.T + c.K, 1);
        const as = c.ranks.map((r, i) => randomArray(r * c.K, r + 11 * i, 1));
        const want = as.map((a, i) => matmulRef(x, a, c.T, c.K, c.ranks[i] as number, { transB: true }));
        const got = await gpuCase(ctx, n, async () => {
          const tx = tensorFromData(ctx, x, [c.T, c.K], 'f32', 'x');
          const roles = c.ranks.map((R, i) => ({
            R,
            l: tensorFromData(ctx, as[i] as Float64Array, [R, c.K], 'f32', `A${i}`),
            out: createTensor(ctx, [c.T, R], 'f32', `h${i}`),
          }));
          const d = await planLoraRowsMulti(ctx, tx, roles, { M: c.T, K: c.K }, n);
          new StepEncoder(ctx, n).dispatch(d).submit();
          const result = await Promise.all(roles.map((r) => readFloat32(r.out)));
          d.dispose();
          tx.dispose();
          for (const r of roles) for (const t of [r.l, r.out]) t.dispose();
          return result;
        });
        for (const [i, g] of got.entries()) {
          expectClose(ctx, `${n} h${i}`, g, want[i] as Float64Array, 3e-5 * Math.sqrt(c.K), 1e-5);
        }
      });
    }
    tableIt(`dA of ${c.ranks.length} modules, ${n}`, async () => {
      const ctx = gpu();
      const x = randomArray(c.T * c.K, c.T + c.K, 1);
      const gs = c.ranks.map((r, i) => randomArray(c.T * r, r + 13 * i, 1));
      const before = c.ranks.map((r, i) => randomArray(r * c.K, 5 + i, 1));
      const coef = c.ranks.map((_, i) => ({ alpha: 0.5 + i, beta: i % 2 }));
      const want = gs.map((g, i) => {
        const { alpha, beta } = coef[i] as { alpha: number; beta: number };
        const b = before[i] as Float64Array;
        return matmulRef(g, x, c.ranks[i] as number, c.T, c.K, { transA: true }).map(
          (v, j) => alpha * v + beta * (b[j] as number),
        );
      });
      const got = await gpuCase(ctx, n, async () => {
        const tx = tensorFromData(ctx, x, [c.T, c.K], 'f32', 'x');
        const roles = c.ranks.map((R, i) => ({
          R,
          ...coef[i],
          l: tensorFromData(ctx, gs[i] as Float64Array, [c.T, R], 'f32', `g${i}`),
          out: tensorFromData(ctx, before[i] as Float64Array, [R, c.K], 'f32', `dA${i}`),
        }));
        const d = await planLoraColsMulti(ctx, tx, roles, { T: c.T, N: c.K }, n);
        new StepEncoder(ctx, n).dispatch(d).submit();
        const result = await Promise.all(roles.map((r) => readFloat32(r.out)));
        d.dispose();
        tx.dispose();
        for (const r of roles) for (const t of [r.l, r.out]) t.dispose();
        return result;
      });
      for (const [i, g] of got.entries()) {
        expectClose(ctx, `${n} dA${i}`, g, want[i] as Float64Array, 3e-5 * Math.sqrt(c.T), 1e-5);
      }
    });
  }
});

// Two modules' g_i = dy_i·B_i and dB_i = s_i·dy_iᵀ·h_i + beta·dB_i in one dispatch (lora_g_db_pair),
// their B and dB views of two arenas at non-zero offsets (a third tensor first, as in a trainer's
// layout), with other ranks and widths on each side; the arenas' other places must stay untouched.
describe('lora g and dB of two modules in one dispatch', () => {
  const pairCases: { T: number; mods: { N: number; R: number }[]; beta: number }[] = [
    {
      T: 65,
      mods: [
        { N: 63, R: 8 },
        { N: 16, R: 4 },
      ],
      beta: 0,
    },
    {
      T: 7,
      mods: [
        { N: 64, R: 1 },
        { N: 257, R: 7 },
      ],
      beta: 1,
    },
    {
      T: 1,
      mods: [
        { N: 32, R: 64 },
        { N: 32, R: 8 },
      ],
      beta: 1,
    },
  ];
  for (const c of pairCases) {
    for (const path of reductionPaths) {
      const n = `T=${c.T} ${c.mods.map((m) => `N=${m.N} r=${m.R}`).join(', ')} beta=${c.beta} (${path.name})`;
      tableIt(n, async (test) => {
        const ctx = path.gpu(test);
        const mods = c.mods.map((m, i) => ({
          ...m,
          scale: 0.5 + i,
          dy: randomArray(c.T * m.N, m.N + i, 1),
          b: randomArray(m.N * m.R, m.R + 7 * i, 1),
          h: randomArray(c.T * m.R, m.R + 3 + i, 1),
          db0: randomArray(m.N * m.R, 17 + i, 1),
        }));
        const want = mods.map((m) => ({
          g: matmulRef(m.dy, m.b, c.T, m.N, m.R),
          db: matmulRef(m.dy, m.h, m.N, c.T, m.R, { transA: true }).map(
            (v, j) => m.scale * v + c.beta * (m.db0[j] as number),
          ),
        }));
        const places = mods.map((m, i) => ({ shape: [m.N, m.R], label: `B${i}` }));
        const got = await gpuCase(ctx, n, async () => {
          // Another tensor first in each arena, of other sizes (past the offset alignment, up to 256
          // bytes), so B and dB sit at different offsets of their arenas.
          const params = new TensorArena(ctx, [{ shape: [100], label: 'other' }, ...places], 'params');
          const grads = new TensorArena(ctx, [{ shape: [3, 5], label: 'other' }, ...places], 'grads');
          writeTensor(grads.views[0] as Tensor, new Float32Array(15).fill(3));
          const io = mods.map((m, i) => {
            const b = params.views[i + 1] as Tensor;
            const db = grads.views[i + 1] as Tensor;
            writeTensor(b, m.b);
            writeTensor(db, m.db0);
            return {
              dy: tensorFromData(ctx, m.dy, [c.T, m.N], 'f32', `dy${i}`),
              h: tensorFromData(ctx, m.h, [c.T, m.R], 'f32', `h${i}`),
              g: createTensor(ctx, [c.T, m.R], 'f32', `g${i}`),
              b,
              db,
              scale: m.scale,
            };
          });
          const d = await planLoraGradGdBPair(ctx, [io[0], io[1]] as [LoraGradModule, LoraGradModule], c.T, c.beta, n);
          new StepEncoder(ctx, n).dispatch(d).submit();
          const result = await Promise.all(
            io.map(async (m) => ({ g: await readFloat32(m.g), db: await readFloat32(m.db) })),
          );
          const other = await readFloat32(grads.views[0] as Tensor);
          d.dispose();
          for (const m of io) for (const t of [m.dy, m.h, m.g]) t.dispose();
          params.dispose();
          grads.dispose();
          return { result, other };
        });
        for (const [i, r] of got.result.entries()) {
          const w = want[i] as { g: Float64Array; db: Float64Array };
          const m = c.mods[i] as { N: number; R: number };
          expectClose(ctx, `${n} g${i}`, r.g, w.g, 3e-5 * Math.sqrt(m.N), 1e-5);
          expectClose(ctx, `${n} dB${i}`, r.db, w.db, 3e-5 * Math.sqrt(c.T), 1e-5);
        }
        expectClose(ctx, `${n} the arena's other place`, got.other, new Float64Array(15).fill(3), 0, 0);
      });
    }
  }

  // lora_g_db_many: q, k and v's g and dB in one dispatch, every operand kind places of one arena
  // (each after another tensor, the modules in another order than the arenas').
  const manyCases: { T: number; mods: { N: number; R: number }[]; beta: number }[] = [
    {
      T: 65,
      mods: [
        { N: 64, R: 8 },
        { N: 16, R: 8 },
        { N: 16, R: 8 },
      ],
      beta: 1,
    },
    {
      T: 7,
      mods: [
        { N: 63, R: 3 },
        { N: 257, R: 1 },
        { N: 20, R: 16 },
      ],
      beta: 0,
    },
    {
      T: 33,
      mods: [
        { N: 32, R: 64 },
        { N: 12, R: 5 },
      ],
      beta: 1,
    },
  ];
  for (const c of manyCases) {
    for (const path of reductionPaths) {
      const n = `many: T=${c.T} ${c.mods.map((m) => `N=${m.N} r=${m.R}`).join(', ')} beta=${c.beta} (${path.name})`;
      tableIt(n, async (test) => {
        const ctx = path.gpu(test);
        const mods = c.mods.map((m, i) => ({
          ...m,
          scale: 0.5 + i,
          dy: randomArray(c.T * m.N, m.N + 31 * i, 1),
          b: randomArray(m.N * m.R, m.R + 7 * i, 1),
          h: randomArray(c.T * m.R, m.R + 3 + i, 1),
          db0: randomArray(m.N * m.R, 17 + i, 1),
        }));
        const want = mods.map((m) => ({
          g: matmulRef(m.dy, m.b, c.T, m.N, m.R),
          db: matmulRef(m.dy, m.h, m.N, c.T, m.R, { transA: true }).map(
            (v, j) => m.scale * v + c.beta * (m.db0[j] as number),
          ),
        }));
        const got = await gpuCase(ctx, n, async () => {
          const arena = (label: string, shape: (m: (typeof mods)[number]) => number[], other: number) =>
            new TensorArena(
              ctx,
              [
                { shape: [other], label: `${label}.other` },
                ...[...mods.entries()].reverse().map(([i, m]) => ({ shape: shape(m), label: `${label}${i}` })),
              ],
              label,
            );
          const k = mods.length;
          const [dys, bs, hs, gs, dbs] = [
            arena('dy', (m) => [c.T, m.N], 9),
            arena('B', (m) => [m.N, m.R], 100),
            arena('h', (m) => [c.T, m.R], 3),
            arena('g', (m) => [c.T, m.R], 70),
            arena('dB', (m) => [m.N, m.R], 15),
          ];
          writeTensor(dbs.views[0] as Tensor, new Float32Array(15).fill(3));
          const io: LoraGradModule[] = mods.map((m, i) => {
            const v = (a: TensorArena) => a.views[k - i] as Tensor;
            writeTensor(v(dys), m.dy);
            writeTensor(v(bs), m.b);
            writeTensor(v(hs), m.h);
            writeTensor(v(dbs), m.db0);
            return { dy: v(dys), b: v(bs), h: v(hs), g: v(gs), db: v(dbs), scale: m.scale };
          });
          const d = await planLoraGradGdBMany(ctx, io, c.T, c.beta, n);
          new StepEncoder(ctx, n).dispatch(d).submit();
          const result = await Promise.all(
            io.map(async (m) => ({ g: await readFloat32(m.g), db: await readFloat32(m.db) })),
          );
          const other = await readFloat32(dbs.views[0] as Tensor);
          d.dispose();
          for (const a of [dys, bs, hs, gs, dbs]) a.dispose();
          return { result, other };
        });
        for (const [i, r] of got.result.entries()) {
          const w = want[i] as { g: Float64Array; db: Float64Array };
          const m = c.mods[i] as { N: number; R: number };
          expectClose(ctx, `${n} g${i}`, r.g, w.g, 3e-5 * Math.sqrt(m.N), 1e-5);
          expectClose(ctx, `${n} dB${i}`, r.db, w.db, 3e-5 * Math.sqrt(c.T), 1e-5);
        }
        expectClose(ctx, `${n} the arena's other place`, got.other, new Float64Array(15).fill(3), 0, 0);
      });
    }
  }

  it('many: refuses operands outside shared buffers, overlapping g, and one or four modules', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'many refusals', async () => {
      const [T, N, R] = [5, 8, 4];
      const arena = (label: string, shape: number[]) =>
        new TensorArena(
          ctx,
          [0, 1, 2, 3].map((i) => ({ shape, label: `${label}${i}` })),
          label,
        );
      const [dys, bs, hs, gs, dbs] = [
        arena('dy', [T, N]),
        arena('B', [N, R]),
        arena('h', [T, R]),
        arena('g', [T, R]),
        arena('dB', [N, R]),
      ];
      const own = createTensor(ctx, [T, N], 'f32', 'dy_own');
      const mod = (i: number): LoraGradModule => ({
        dy: dys.views[i] as Tensor,
        b: bs.views[i] as Tensor,
        h: hs.views[i] as Tensor,
        g: gs.views[i] as Tensor,
        db: dbs.views[i] as Tensor,
        scale: 1,
      });
      const plan = (m: LoraGradModule[]) => planLoraGradGdBMany(ctx, m, T, 0, 'many');
      await expect(plan([mod(0), { ...mod(1), dy: own }])).rejects.toThrow(/dy dy_own is not in dy0's buffer/);
      await expect(plan([mod(0), { ...mod(1), g: gs.views[0] as Tensor }])).rejects.toThrow(/g places overlap/);
      await expect(plan([mod(0)])).rejects.toThrow(/not two or three/);
      await expect(plan([0, 1, 2, 3].map(mod))).rejects.toThrow(/not two or three/);
      own.dispose();
      for (const a of [dys, bs, hs, gs, dbs]) a.dispose();
    });
  });

  it('refuses B or dB outside shared buffers, and one module twice', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'pair refusals', async () => {
      const [T, N, R] = [5, 8, 4];
      const params = new TensorArena(
        ctx,
        [0, 1].map((i) => ({ shape: [N, R], label: `B${i}` })),
        'params',
      );
      const grads = new TensorArena(
        ctx,
        [0, 1].map((i) => ({ shape: [N, R], label: `dB${i}` })),
        'grads',
      );
      const own = createTensor(ctx, [N, R], 'f32', 'B_own');
      const rows = ['dy', 'h', 'g'].map((l) => createTensor(ctx, [T, l === 'dy' ? N : R], 'f32', l));
      const [dy, h, g] = rows as [Tensor, Tensor, Tensor];
      const mod = (b: Tensor, db: Tensor): LoraGradModule => ({ dy, h, g, b, db, scale: 1 });
      const [b0, b1] = params.views as [Tensor, Tensor];
      const [d0, d1] = grads.views as [Tensor, Tensor];
      await expect(planLoraGradGdBPair(ctx, [mod(b0, d0), mod(own, d1)], T, 0, 'p')).rejects.toThrow(/B_own/);
      await expect(planLoraGradGdBPair(ctx, [mod(b0, d0), mod(b1, d0)], T, 0, 'p')).rejects.toThrow(ShapeError);
      for (const t of [own, ...rows]) t.dispose();
      params.dispose();
      grads.dispose();
    });
  });
});
