// GPU matmul (shaders/matmul.wgsl) against the float64 reference on awkward shapes, both
// layouts of W, f32, packed-f16, Q8_0 and Q4_0 weights, bias, accumulation and the fused
// low-rank term; the activation epilogues (silu·mul, gelu_new, forward and backward) in the
// tiled and matvec kernels; and the RoPE epilogue against the float64 RoPE of the product.
import { describe, expect, inject, it } from 'vitest';
import { geluNewBackwardRef, geluNewForwardRef, siluMulBackwardRef, siluMulForwardRef } from '../ref/activations.js';
import { asStored, randomArray } from '../ref/check.js';
import { addRef, matmulRef } from '../ref/matmul.js';
import { rmsnormBackwardRef, rmsnormForwardRef } from '../ref/rmsnorm.js';
import { ropeForwardRef } from '../ref/rope.js';
import {
  createTensor,
  type DType,
  type MatmulOptions,
  type MatvecVariant,
  planMatmul,
  planQkvMatmul,
  type QkvProjection,
  readFloat32,
  ShapeError,
  StepEncoder,
  type Tensor,
  tensorFromData,
  tensorView,
  writeTensor,
} from '../src/index.js';
import { expectClose, gpuCase, tableCases, useGpu, useReductionPaths } from './gpu.js';

// Which of the table's cases each test project runs: gpu.ts's tableCases.
const tableIt = tableCases({ splitAcrossProfiles: (title) => title.endsWith(' (staged)') });

// The matrix-vector kernels' reduction has a subgroup build and a workgroup-memory one: the split-K
// matvec cases run on both (the second skips where the adapter has no subgroups).
const paths = useReductionPaths();
const gpu = paths[0].gpu;
// The tiled kernels read their operands staged through workgroup memory or, where an adapter
// measures that faster, straight from the buffers (matmul.wgsl's DIRECT): the entries that have
// both run both under Node on SwiftShader, and each other project the reading its adapter gets
// (vitest.config.ts: staged with the GPU configurations and on Chromium's SwiftShader, direct on
// lavapipe), since every case is a pipeline of its own and compiling them is what costs CI.
const STAGING_NAMES = { workgroup: 'staged', direct: 'direct' } as const;
const stagings = (inject('matmulStagings') ?? (['workgroup', 'direct'] as const)).map((staging) => ({
  name: STAGING_NAMES[staging],
  gpu: useGpu({ matmulStaging: staging }),
}));

/** The contexts a case runs on, with the suffix of its title: both stagings where its entry has
 * both, the adapter's own context where it has one (matvec, the fusions that stage their own). */
function stagingsFor(both: boolean): { suffix: string; gpu: () => ReturnType<typeof gpu> }[] {
  return both ? stagings.map((s) => ({ suffix: ` (${s.name})`, gpu: s.gpu })) : [{ suffix: '', gpu }];
}
const M_SIZES = [1, 7, 65, 257];
const KN_SIZES = [1, 63, 64, 65, 257];
const LAYOUTS = [{ transW: true }, { transW: false }];

interface Case {
  M: number;
  N: number;
  K: number;
  transW: boolean;
  wDtype: DType;
  bias: boolean;
  beta: number;
  rank: number;
  /** For M ≤ MATVEC_MAX_ROWS with Wᵀ: which matvec kernel (both run everywhere in the tests). */
  matvec?: MatvecVariant;
}

// A covering design: every M with every K, N and the layout rotating, so each size meets each
// other size and each layout without running the full product of all of them.
const cases: Case[] = [];
M_SIZES.forEach((M, i) => {
  KN_SIZES.forEach((K, j) => {
    const layout = LAYOUTS[(i + j) % LAYOUTS.length] as (typeof LAYOUTS)[number];
    cases.push({
      M,
      K,
      N: KN_SIZES[(i + 2 * j + 1) % KN_SIZES.length] as number,
      ...layout,
      wDtype: (i + j) % 2 ? 'f16' : 'f32',
      bias: j % 2 === 0,
      beta: i % 2 ? 1 : 0,
      rank: 0,
    });
  });
});
// The vec4 paths with aligned shapes, a thin N, and the low-rank term in both layouts.
cases.push({ M: 64, N: 128, K: 256, transW: true, wDtype: 'f32', bias: false, beta: 0, rank: 0 });
cases.push({ M: 128, N: 64, K: 192, transW: false, wDtype: 'f16', bias: true, beta: 0, rank: 0 });
cases.push({ M: 65, N: 8, K: 257, transW: true, wDtype: 'f32', bias: false, beta: 0, rank: 0 });
cases.push({ M: 65, N: 63, K: 64, transW: true, wDtype: 'f16', bias: true, beta: 1, rank: 7 });
cases.push({ M: 7, N: 257, K: 65, transW: false, wDtype: 'f32', bias: false, beta: 0, rank: 64 });
cases.push({ M: 64, N: 64, K: 64, transW: false, wDtype: 'f16', bias: false, beta: 0, rank: 1 });
// The matrix-vector kernel (M ≤ MATVEC_MAX_ROWS with Wᵀ): every row count, N not a multiple of
// 4, K shorter and longer than one pass of its invocations (64 vec4s), both dtypes, and every
// option, the low-rank term at r = 1 and 64 included.
for (const matvec of ['split-k', 'rows'] as const) {
  cases.push({ M: 1, N: 257, K: 65, transW: true, wDtype: 'f16', bias: true, beta: 0, rank: 0, matvec });
  cases.push({ M: 2, N: 63, K: 257, transW: true, wDtype: 'f16', bias: true, beta: 1, rank: 0, matvec });
  cases.push({ M: 3, N: 257, K: 1024, transW: true, wDtype: 'f32', bias: false, beta: 0, rank: 64, matvec });
  cases.push({ M: 4, N: 65, K: 64, transW: true, wDtype: 'f16', bias: false, beta: 1, rank: 1, matvec });
  cases.push({ M: 1, N: 7, K: 1031, transW: true, wDtype: 'f32', bias: true, beta: 0, rank: 7, matvec });
}
// One row past the matvec kernel: the tiled one again.
cases.push({ M: 5, N: 65, K: 63, transW: true, wDtype: 'f32', bias: true, beta: 1, rank: 8 });
// Quantized W: blocks of 32 along its stored rows, so K (x·Wᵀ) or N (dy·W) is a multiple of 32;
// the other dimension odd, so both the whole-word loads (K % 4 = 0 with Wᵀ, or N and K multiples
// of 4 with W) and the element-by-element ones run; the tiled kernel, both matvec splits, the
// low-rank term at r = 1 and 64, bias and accumulation.
for (const wDtype of ['q8_0', 'q4_0'] as const) {
  cases.push({ M: 1, N: 257, K: 32, transW: true, wDtype, bias: true, beta: 0, rank: 0 });
  cases.push({ M: 7, N: 63, K: 96, transW: true, wDtype, bias: false, beta: 1, rank: 1 });
  cases.push({ M: 65, N: 65, K: 256, transW: true, wDtype, bias: true, beta: 0, rank: 64 });
  cases.push({ M: 257, N: 64, K: 64, transW: true, wDtype, bias: false, beta: 0, rank: 0 });
  cases.push({ M: 7, N: 96, K: 65, transW: false, wDtype, bias: true, beta: 1, rank: 7 });
  cases.push({ M: 65, N: 32, K: 257, transW: false, wDtype, bias: false, beta: 0, rank: 0 });
  cases.push({ M: 64, N: 128, K: 64, transW: false, wDtype, bias: false, beta: 0, rank: 1 });
  cases.push({ M: 1, N: 64, K: 1, transW: false, wDtype, bias: false, beta: 1, rank: 0 });
  for (const matvec of ['split-k', 'rows'] as const) {
    cases.push({ M: 1, N: 65, K: 1024, transW: true, wDtype, bias: true, beta: 0, rank: 8, matvec });
    cases.push({ M: 4, N: 7, K: 96, transW: true, wDtype, bias: false, beta: 1, rank: 0, matvec });
  }
}

/** W as the GPU will hold it: rounded to f16, or quantized and dequantized. */

function describeCase(c: Case): string {
  const lay = `A·${c.transW ? 'Wᵀ' : 'W'}`;
  return `M=${c.M} N=${c.N} K=${c.K} ${lay} W:${c.wDtype}${c.bias ? ' +bias' : ''}${c.beta ? ' +=C' : ''}${c.rank ? ` +rank ${c.rank}` : ''}${c.matvec ? ` matvec ${c.matvec}` : ''}`;
}

describe('matmul on a slice of W', () => {
  // [rows stored, cols stored, start, count, dtype, transW, M (default 7; 1 takes matvec)]
  for (const [R, C, start, count, dtype, transW, rowsOfA] of [
    [257, 65, 128, 129, 'f32', true],
    [300, 64, 128, 100, 'f16', true],
    [9, 7, 3, 5, 'f16', true],
    [9, 7, 3, 5, 'f16', true, 1],
    [300, 64, 128, 100, 'f32', true, 1],
    [300, 64, 128, 100, 'f16', false],
    [257, 63, 1, 200, 'f32', false],
    [130, 64, 65, 64, 'q8_0', true],
    [130, 96, 3, 100, 'q4_0', true, 1],
    [65, 32, 1, 63, 'q4_0', false],
    [65, 64, 32, 33, 'q8_0', false],
  ] as [number, number, number, number, DType, boolean, number?][]) {
    const M = rowsOfA ?? 7;
    for (const s of stagingsFor(!(transW && M === 1)))
      tableIt(
        `M=${M}, rows [${start}, ${start + count}) of a ${R}×${C} ${dtype} W${transW ? 'ᵀ' : ''}${s.suffix}`,
        async () => {
          const ctx = s.gpu();
          const K = transW ? C : count;
          const N = transW ? count : C;
          const a = randomArray(M * K, R + C);
          const w = asStored(randomArray(R * C, R + C + 1), dtype);
          const want = matmulRef(a, w.subarray(start * C, (start + count) * C), M, K, N, { transB: transW });
          const got = await gpuCase(ctx, 'wRows', async () => {
            const ta = tensorFromData(ctx, a, [M, K], 'f32', 'a');
            const tw = tensorFromData(ctx, w, [R, C], dtype, 'w');
            const tc = createTensor(ctx, [M, N], 'f32', 'c');
            const d = await planMatmul(ctx, ta, tw, tc, { transW, wRows: { start, count } });
            new StepEncoder(ctx, 'slice').dispatch(d).submit();
            const out = await readFloat32(tc);
            d.dispose();
            for (const t of [ta, tw, tc]) t.dispose();
            return out;
          });
          expectClose(ctx, `wRows ${start}+${count}`, got, want, 2e-5 * Math.sqrt(K), 1e-5);
        },
      );
  }
});

describe('matmul', () => {
  const runs = [
    ...cases.filter((c) => c.matvec).map((c) => ({ c, path: paths[0], title: describeCase(c) })),
    ...cases
      .filter((c) => !c.matvec)
      .flatMap((c) => stagings.map((s) => ({ c, path: { gpu: s.gpu }, title: `${describeCase(c)} (${s.name})` }))),
    ...cases
      .filter((c) => c.matvec === 'split-k')
      .map((c) => ({ c, path: paths[1], title: `${describeCase(c)} (${paths[1].name})` })),
  ];
  for (const { c, path, title } of runs) {
    tableIt(title, async (t) => {
      const ctx = path.gpu(t);
      const seed = c.M * 1000 + c.N * 10 + c.K;
      const a = randomArray(c.M * c.K, seed);
      const w = asStored(randomArray(c.N * c.K, seed + 1), c.wDtype);
      const bias = randomArray(c.N, seed + 2);
      const c0 = randomArray(c.M * c.N, seed + 3);
      const a2 = randomArray(c.M * c.rank, seed + 4);
      const b2 = randomArray(c.N * c.rank, seed + 5);
      const alpha = 0.75;
      const alpha2 = 1.5;

      let want = matmulRef(a, w, c.M, c.K, c.N, { transB: c.transW });
      want = want.map((v) => v * alpha);
      if (c.rank) want = addRef(want, matmulRef(a2, b2, c.M, c.rank, c.N, { transB: c.transW }), alpha2);
      if (c.bias) want = want.map((v, i) => v + (bias[i % c.N] as number));
      if (c.beta) want = addRef(want, c0, c.beta);

      const got = await gpuCase(ctx, describeCase(c), async () => {
        const ta = tensorFromData(ctx, a, [c.M, c.K], 'f32', 'a');
        const tw = tensorFromData(ctx, w, c.transW ? [c.N, c.K] : [c.K, c.N], c.wDtype, 'w');
        const tb = tensorFromData(ctx, bias, [c.N], 'f32', 'bias');
        const tc = c.beta ? tensorFromData(ctx, c0, [c.M, c.N], 'f32', 'c') : createTensor(ctx, [c.M, c.N], 'f32', 'c');
        const ta2 = c.rank ? tensorFromData(ctx, a2, [c.M, c.rank], 'f32', 'a2') : undefined;
        const tb2 = c.rank ? tensorFromData(ctx, b2, c.transW ? [c.N, c.rank] : [c.rank, c.N], 'f32', 'b2') : undefined;
        const d = await planMatmul(ctx, ta, tw, tc, {
          transW: c.transW,
          alpha,
          beta: c.beta,
          bias: c.bias ? tb : undefined,
          lowRank: ta2 && tb2 ? { a2: ta2, b2: tb2, alpha2 } : undefined,
          matvecVariant: c.matvec,
        });
        new StepEncoder(ctx, 'matmul test').dispatch(d).submit();
        const out = await readFloat32(tc);
        d.dispose();
        for (const t of [ta, tw, tb, tc, ta2, tb2]) t?.dispose();
        return out;
      });
      expectClose(ctx, describeCase(c), got, want, 2e-5 * Math.sqrt(c.K + c.rank), 1e-5);
    });
  }
});

// The MLP nonlinearity stored by the matmul itself: forward C = x·Wᵀ (+ bias) and act = silu(gate)·C
// or gelu_new(C); backward C = dy·W = ∂L/∂act, stored as ∂L/∂gate and ∂L/∂up or ∂L/∂pre.
describe('matmul activation epilogues', () => {
  const shapes = [
    { M: 65, N: 63, K: 64 },
    { M: 7, N: 257, K: 65 },
    { M: 1, N: 65, K: 64 },
    { M: 3, N: 64, K: 63 },
  ];
  for (const kind of ['silu_mul', 'gelu'] as const) {
    for (const { M, N, K } of shapes) {
      const name = `${kind} M=${M} N=${N} K=${K}`;
      for (const s of stagingsFor(M > 4))
        tableIt(`forward ${name}${M <= 4 ? ' (matvec)' : ''}${s.suffix}`, async () => {
          const ctx = s.gpu();
          const x = randomArray(M * K, M + K, 1);
          const w = randomArray(N * K, N + 1, 1);
          const bias = randomArray(N, 3, 1);
          const gate = randomArray(M * N, 4, 2);
          const pre = matmulRef(x, w, M, K, N, { transB: true }).map(
            (v, i) => v + (kind === 'gelu' ? (bias[i % N] as number) : 0),
          );
          const want = kind === 'silu_mul' ? siluMulForwardRef(gate, pre).out : geluNewForwardRef(pre).y;
          const got = await gpuCase(ctx, name, async () => {
            const tx = tensorFromData(ctx, x, [M, K], 'f32', 'x');
            const tw = tensorFromData(ctx, w, [N, K], 'f32', 'w');
            const tb = tensorFromData(ctx, bias, [N], 'f32', 'bias');
            const tg = tensorFromData(ctx, gate, [M, N], 'f32', 'gate');
            const c = createTensor(ctx, [M, N], 'f32', 'c');
            const act = createTensor(ctx, [M, N], 'f32', 'act');
            const d = await planMatmul(ctx, tx, tw, c, {
              ...(kind === 'gelu' ? { bias: tb } : {}),
              activation: kind === 'silu_mul' ? { kind, gate: tg, act } : { kind, act },
            });
            new StepEncoder(ctx, name).dispatch(d).submit();
            const out = { c: await readFloat32(c), act: await readFloat32(act) };
            d.dispose();
            for (const t of [tx, tw, tb, tg, c, act]) t.dispose();
            return out;
          });
          expectClose(ctx, `${name} C`, got.c, pre, 2e-5 * Math.sqrt(K), 1e-5);
          expectClose(ctx, `${name} act`, got.act, want, 4e-5 * Math.sqrt(K), 1e-5);
        });
      for (const s of stagings)
        tableIt(`backward ${name} (${s.name})`, async () => {
          const ctx = s.gpu();
          // dact = dy·W (W stored K×N: the down projection's dx layout, out = N here).
          const dy = randomArray(M * K, M + 2 * K, 1);
          const w = randomArray(K * N, N + 5, 1);
          const gate = randomArray(M * N, 6, 2);
          const up = randomArray(M * N, 7, 1);
          const dact = matmulRef(dy, w, M, K, N);
          const want =
            kind === 'silu_mul'
              ? siluMulBackwardRef(gate, up, dact)
              : { dgate: geluNewBackwardRef(gate, dact).dx, dup: undefined };
          const got = await gpuCase(ctx, name, async () => {
            const tdy = tensorFromData(ctx, dy, [M, K], 'f32', 'dy');
            const tw = tensorFromData(ctx, w, [K, N], 'f32', 'w');
            const tg = tensorFromData(ctx, gate, [M, N], 'f32', 'gate');
            const tu = tensorFromData(ctx, up, [M, N], 'f32', 'up');
            const c = createTensor(ctx, [M, N], 'f32', 'dgate');
            const dup = createTensor(ctx, [M, N], 'f32', 'dup');
            const d = await planMatmul(ctx, tdy, tw, c, {
              transW: false,
              activationBackward: kind === 'silu_mul' ? { kind, gate: tg, up: tu, dup } : { kind, pre: tg },
            });
            new StepEncoder(ctx, name).dispatch(d).submit();
            const out = { dgate: await readFloat32(c), dup: await readFloat32(dup) };
            d.dispose();
            for (const t of [tdy, tw, tg, tu, c, dup]) t.dispose();
            return out;
          });
          expectClose(ctx, `${name} dgate`, got.dgate, want.dgate, 4e-5 * Math.sqrt(K), 1e-5);
          if (want.dup) expectClose(ctx, `${name} dup`, got.dup, want.dup, 4e-5 * Math.sqrt(K), 1e-5);
        });
    }
  }
});

// matmul_sum: C = alpha·(A·opW(W) + A3·opW(W3)) + alpha2·A2·opW(B2) + bias + beta·C, the two
// dense products in different storage formats (the backward's dx of two projections at once).
describe('matmul with a second product', () => {
  const sums: (Omit<Case, 'wDtype' | 'matvec'> & { K3: number; w: DType; w3: DType })[] = [
    { M: 65, N: 63, K: 64, K3: 96, transW: false, w: 'f32', w3: 'f16', rank: 7, bias: false, beta: 1 },
    { M: 7, N: 96, K: 65, K3: 33, transW: false, w: 'q4_0', w3: 'q8_0', rank: 0, bias: true, beta: 0 },
    { M: 257, N: 64, K: 63, K3: 1, transW: true, w: 'f16', w3: 'f32', rank: 1, bias: true, beta: 0 },
    { M: 64, N: 128, K: 128, K3: 64, transW: false, w: 'f32', w3: 'q4_0', rank: 8, bias: false, beta: 0 },
    { M: 5, N: 33, K: 96, K3: 64, transW: true, w: 'q8_0', w3: 'q4_0', rank: 0, bias: true, beta: 1 },
    { M: 1, N: 64, K: 32, K3: 64, transW: false, w: 'f16', w3: 'f16', rank: 64, bias: false, beta: 0 },
  ];
  for (const c of sums) {
    const name = `M=${c.M} N=${c.N} K=${c.K}+${c.K3} A·${c.transW ? 'Wᵀ' : 'W'} W:${c.w} W3:${c.w3}${c.rank ? ` +rank ${c.rank}` : ''}${c.bias ? ' +bias' : ''}${c.beta ? ' +=C' : ''}`;
    for (const s of stagings)
      tableIt(`${name} (${s.name})`, async () => {
        const ctx = s.gpu();
        const seed = c.M + c.N + c.K + c.K3;
        const a = randomArray(c.M * c.K, seed);
        const w = asStored(randomArray(c.N * c.K, seed + 1), c.w);
        const a3 = randomArray(c.M * c.K3, seed + 2);
        const w3 = asStored(randomArray(c.N * c.K3, seed + 3), c.w3);
        const a2 = randomArray(c.M * c.rank, seed + 4);
        const b2 = randomArray(c.N * c.rank, seed + 5);
        const bias = randomArray(c.N, seed + 6);
        const c0 = randomArray(c.M * c.N, seed + 7);
        const alpha = 0.75;
        const alpha2 = 1.5;
        const opts = { transB: c.transW };
        let want = addRef(matmulRef(a, w, c.M, c.K, c.N, opts), matmulRef(a3, w3, c.M, c.K3, c.N, opts), 1);
        want = want.map((v) => v * alpha);
        if (c.rank) want = addRef(want, matmulRef(a2, b2, c.M, c.rank, c.N, opts), alpha2);
        if (c.bias) want = want.map((v, i) => v + (bias[i % c.N] as number));
        if (c.beta) want = addRef(want, c0, c.beta);
        const got = await gpuCase(ctx, name, async () => {
          const shape = (k: number) => (c.transW ? [c.N, k] : [k, c.N]);
          const ta = tensorFromData(ctx, a, [c.M, c.K], 'f32', 'a');
          const tw = tensorFromData(ctx, w, shape(c.K), c.w, 'w');
          const ta3 = tensorFromData(ctx, a3, [c.M, c.K3], 'f32', 'a3');
          const tw3 = tensorFromData(ctx, w3, shape(c.K3), c.w3, 'w3');
          const tb = tensorFromData(ctx, bias, [c.N], 'f32', 'bias');
          const tc = tensorFromData(ctx, c0, [c.M, c.N], 'f32', 'c');
          const ta2 = c.rank ? tensorFromData(ctx, a2, [c.M, c.rank], 'f32', 'a2') : undefined;
          const tb2 = c.rank ? tensorFromData(ctx, b2, shape(c.rank), 'f32', 'b2') : undefined;
          const d = await planMatmul(ctx, ta, tw, tc, {
            transW: c.transW,
            alpha,
            beta: c.beta,
            bias: c.bias ? tb : undefined,
            lowRank: ta2 && tb2 ? { a2: ta2, b2: tb2, alpha2 } : undefined,
            extra: { a: ta3, w: tw3 },
          });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = await readFloat32(tc);
          d.dispose();
          for (const t of [ta, tw, ta3, tw3, tb, tc, ta2, tb2]) t?.dispose();
          return out;
        });
        expectClose(ctx, name, got, want, 2e-5 * Math.sqrt(c.K + c.K3 + c.rank), 1e-5);
      });
  }
});

// matmul_sum_lr: C = alpha·(A·opW(W) + A3·opW(W3) + A4·opW(W4)) + alpha2·A2·opW(B2) +
// alpha2b·A2b·opW(B2b) + alpha2c·A2c·opW(B2c) + beta·C, the backward's dx of q, k and v with up to
// three LoRA terms in one dispatch. A3 and A4 are places in one buffer, the A2 in another, the B2 in a third (as
// dk/dv, LoRA's g slots and the parameters' arena are), each at an offset, so a kernel that read a
// place at the wrong offset, or one term's operand for another's, fails.
describe('matmul with three products and up to three low-rank terms', () => {
  interface SumLr {
    M: number;
    N: number;
    K: number;
    K3: number;
    /** 0: no third product. */
    K4: number;
    transW: boolean;
    w: DType;
    w3: DType;
    w4: DType;
    r1: number;
    /** 0: no second low-rank term. */
    r2: number;
    /** 0 or absent: no third low-rank term. */
    r3?: number;
    beta: number;
  }
  const sums: SumLr[] = [
    // What training plans: W untransposed, aligned, q (576) with k and v (192) at a small scale.
    { M: 64, N: 96, K: 96, K3: 32, K4: 32, transW: false, w: 'f16', w3: 'f16', w4: 'f16', r1: 8, r2: 8, beta: 0 },
    // Unaligned N and ranks, accumulating.
    { M: 65, N: 63, K: 64, K3: 33, K4: 31, transW: false, w: 'f32', w3: 'f32', w4: 'f16', r1: 3, r2: 5, beta: 1 },
    // Quantized W3 and W4, no third product: gate and up with both LoRA terms.
    { M: 37, N: 64, K: 64, K3: 64, K4: 0, transW: false, w: 'q8_0', w3: 'q4_0', w4: 'q4_0', r1: 4, r2: 16, beta: 1 },
    // A third product and one LoRA term (bound whole at its offset).
    { M: 33, N: 128, K: 32, K3: 64, K4: 96, transW: false, w: 'f16', w3: 'q8_0', w4: 'q4_0', r1: 8, r2: 0, beta: 0 },
    // W transposed.
    { M: 20, N: 96, K: 64, K3: 32, K4: 64, transW: true, w: 'f32', w3: 'f16', w4: 'f32', r1: 16, r2: 7, beta: 1 },
    // q, k and v all adapted (all-linear): three LoRA terms, aligned as training plans them.
    {
      M: 64,
      N: 96,
      K: 96,
      K3: 32,
      K4: 32,
      transW: false,
      w: 'f16',
      w3: 'q8_0',
      w4: 'f16',
      r1: 8,
      r2: 8,
      r3: 8,
      beta: 0,
    },
    // Three LoRA terms of unaligned ranks, accumulating, W transposed.
    {
      M: 37,
      N: 60,
      K: 32,
      K3: 24,
      K4: 16,
      transW: true,
      w: 'f32',
      w3: 'f32',
      w4: 'f16',
      r1: 3,
      r2: 1,
      r3: 6,
      beta: 1,
    },
  ];
  for (const c of sums) {
    const r3 = c.r3 ?? 0;
    const name = `M=${c.M} N=${c.N} K=${c.K}+${c.K3}+${c.K4} A·${c.transW ? 'Wᵀ' : 'W'} W:${c.w} W3:${c.w3} W4:${c.w4} ranks ${c.r1}+${c.r2}${r3 ? `+${r3}` : ''}${c.beta ? ' +=C' : ''}`;
    for (const s of stagings)
      tableIt(`${name} (${s.name})`, async () => {
        const ctx = s.gpu();
        const seed = 3 * c.M + c.N + c.K + c.K3 + c.K4;
        const opts = { transB: c.transW };
        const wShape = (k: number) => (c.transW ? [c.N, k] : [k, c.N]);
        const a = randomArray(c.M * c.K, seed);
        const w = asStored(randomArray(c.N * c.K, seed + 1), c.w);
        const a3 = randomArray(c.M * c.K3, seed + 2);
        const w3 = asStored(randomArray(c.N * c.K3, seed + 3), c.w3);
        const a4 = randomArray(c.M * c.K4, seed + 4);
        const w4 = asStored(randomArray(c.N * c.K4, seed + 5), c.w4);
        const a2 = randomArray(c.M * c.r1, seed + 6);
        const b2 = randomArray(c.N * c.r1, seed + 7);
        const a2b = randomArray(c.M * c.r2, seed + 8);
        const b2b = randomArray(c.N * c.r2, seed + 9);
        const c0 = randomArray(c.M * c.N, seed + 10);
        const a2c = randomArray(c.M * r3, seed + 11);
        const b2c = randomArray(c.N * r3, seed + 12);
        const alpha = 0.75;
        const alpha2 = 1.5;
        const alpha2b = -0.625;
        const alpha2c = 0.375;
        let want = addRef(matmulRef(a, w, c.M, c.K, c.N, opts), matmulRef(a3, w3, c.M, c.K3, c.N, opts), 1);
        if (c.K4) want = addRef(want, matmulRef(a4, w4, c.M, c.K4, c.N, opts), 1);
        want = want.map((v) => v * alpha);
        want = addRef(want, matmulRef(a2, b2, c.M, c.r1, c.N, opts), alpha2);
        if (c.r2) want = addRef(want, matmulRef(a2b, b2b, c.M, c.r2, c.N, opts), alpha2b);
        if (r3) want = addRef(want, matmulRef(a2c, b2c, c.M, r3, c.N, opts), alpha2c);
        if (c.beta) want = addRef(want, c0, c.beta);
        const got = await gpuCase(ctx, name, async () => {
          const owned: Tensor[] = [];
          const own = (t: Tensor) => {
            owned.push(t);
            return t;
          };
          // Places of one buffer, each 256 bytes past the end of the one before (the arenas' alignment),
          // in the order given; junk (NaN) everywhere else, so a read outside a place poisons C.
          const places = (label: string, parts: { data: ArrayLike<number>; shape: number[] }[]) => {
            const bytes = (n: number) => Math.ceil((n * 4) / 256) * 256 + 256;
            const total = parts.reduce((n, p) => n + bytes(p.data.length), 256);
            const arena = own(
              tensorFromData(ctx, new Float32Array(total / 4).fill(Number.NaN), [total / 4], 'f32', label),
            );
            let off = 256;
            return parts.map((p, i) => {
              const v = tensorView(arena, off, p.shape, 'f32', `${label}[${i}]`);
              writeTensor(v, p.data);
              off += bytes(p.data.length);
              return v;
            });
          };
          const ta = own(tensorFromData(ctx, a, [c.M, c.K], 'f32', 'a'));
          const tw = own(tensorFromData(ctx, w, wShape(c.K), c.w, 'w'));
          const tw3 = own(tensorFromData(ctx, w3, wShape(c.K3), c.w3, 'w3'));
          const tw4 = c.K4 ? own(tensorFromData(ctx, w4, wShape(c.K4), c.w4, 'w4')) : undefined;
          const tc = own(tensorFromData(ctx, c0, [c.M, c.N], 'f32', 'c'));
          // A4 before A3, and the second term's operands before the first's, the third's between, in
          // their buffers.
          const dense = places('a3', [
            ...(c.K4 ? [{ data: a4, shape: [c.M, c.K4] }] : []),
            { data: a3, shape: [c.M, c.K3] },
          ]);
          const gs = places('a2', [
            ...(c.r2 ? [{ data: a2b, shape: [c.M, c.r2] }] : []),
            ...(r3 ? [{ data: a2c, shape: [c.M, r3] }] : []),
            { data: a2, shape: [c.M, c.r1] },
          ]);
          const bs = places('b2', [
            ...(c.r2 ? [{ data: b2b, shape: wShape(c.r2) }] : []),
            ...(r3 ? [{ data: b2c, shape: wShape(r3) }] : []),
            { data: b2, shape: wShape(c.r1) },
          ]);
          const ta3 = dense[dense.length - 1] as Tensor;
          const ta4 = c.K4 ? dense[0] : undefined;
          const second = c.r2 ? { a2: gs[0] as Tensor, b2: bs[0] as Tensor, alpha2: alpha2b } : undefined;
          const third = r3 ? { a2: gs[1] as Tensor, b2: bs[1] as Tensor, alpha2: alpha2c } : undefined;
          const d = await planMatmul(ctx, ta, tw, tc, {
            transW: c.transW,
            alpha,
            beta: c.beta,
            lowRank: { a2: gs[gs.length - 1] as Tensor, b2: bs[bs.length - 1] as Tensor, alpha2, second, third },
            extra: { a: ta3, w: tw3, third: ta4 && tw4 ? { a: ta4, w: tw4 } : undefined },
          });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = await readFloat32(tc);
          d.dispose();
          for (const t of owned) t.dispose();
          return out;
        });
        expectClose(ctx, name, got, want, 2e-5 * Math.sqrt(c.K + c.K3 + c.K4 + c.r1 + c.r2 + r3), 1e-5);
      });
  }

  it('refuses places in other buffers and a bias', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'matmul_sum_lr refusals', async () => {
      const M = 8;
      const N = 16;
      const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const [a, w, c, a3, w3, a4, w4, g, ga, bb, ba, bias] = [
        t([M, 16], 'a'),
        t([16, N], 'w'),
        t([M, N], 'c'),
        t([M, 8], 'a3'),
        t([8, N], 'w3'),
        t([M, 8], 'a4 elsewhere'),
        t([8, N], 'w4'),
        t([M, 4], 'g'),
        t([M, 4], 'g elsewhere'),
        t([4, N], 'A'),
        t([4, N], 'A elsewhere'),
        t([N], 'bias'),
      ] as Tensor[];
      const lowRank = { a2: g as Tensor, b2: bb as Tensor, alpha2: 1 };
      await expect(
        planMatmul(ctx, a as Tensor, w as Tensor, c as Tensor, {
          transW: false,
          extra: { a: a3 as Tensor, w: w3 as Tensor, third: { a: a4 as Tensor, w: w4 as Tensor } },
        }),
      ).rejects.toThrow(/A4 a4 elsewhere must be a place in A3 a3's buffer/);
      await expect(
        planMatmul(ctx, a as Tensor, w as Tensor, c as Tensor, {
          transW: false,
          lowRank: { ...lowRank, second: { a2: ga as Tensor, b2: ba as Tensor, alpha2: 1 } },
          extra: { a: a3 as Tensor, w: w3 as Tensor },
        }),
      ).rejects.toThrow(/places in the first's buffers/);
      await expect(
        planMatmul(ctx, a as Tensor, w as Tensor, c as Tensor, {
          transW: false,
          bias,
          lowRank: { ...lowRank, second: { a2: g as Tensor, b2: bb as Tensor, alpha2: 1 } },
          extra: { a: a3 as Tensor, w: w3 as Tensor },
        }),
      ).rejects.toThrow(/takes no bias/);
      await expect(
        planMatmul(ctx, a as Tensor, w as Tensor, c as Tensor, {
          transW: false,
          lowRank: { ...lowRank, second: { a2: g as Tensor, b2: bb as Tensor, alpha2: 1 } },
        }),
      ).rejects.toThrow(/needs `extra`/);
      await expect(
        planMatmul(ctx, a as Tensor, w as Tensor, c as Tensor, {
          transW: false,
          lowRank: { ...lowRank, third: { a2: g as Tensor, b2: bb as Tensor, alpha2: 1 } },
          extra: { a: a3 as Tensor, w: w3 as Tensor },
        }),
      ).rejects.toThrow(/third low-rank term needs a second/);
      await expect(
        planMatmul(ctx, a as Tensor, w as Tensor, c as Tensor, {
          transW: false,
          lowRank: {
            ...lowRank,
            second: { a2: g as Tensor, b2: bb as Tensor, alpha2: 1 },
            third: { a2: ga as Tensor, b2: bb as Tensor, alpha2: 1 },
          },
          extra: { a: a3 as Tensor, w: w3 as Tensor },
        }),
      ).rejects.toThrow(/the third low-rank term's operands must be places in the first's buffers/);
      for (const x of [a, w, c, a3, w3, a4, w4, g, ga, bb, ba, bias]) x?.dispose();
    });
  });
});

// matmul_glu / matvec_glu: gate = x·Wgᵀ, up = x·Wuᵀ and act = silu(gate)·up from one dispatch,
// the two weights in different storage formats.
describe('gated MLP in one dispatch', () => {
  const glus: { M: number; N: number; K: number; wg: DType; wu: DType; matvec?: MatvecVariant }[] = [
    { M: 65, N: 63, K: 64, wg: 'f32', wu: 'f16' },
    { M: 7, N: 257, K: 65, wg: 'f16', wu: 'f32' },
    { M: 257, N: 64, K: 32, wg: 'q4_0', wu: 'q4_0' },
    { M: 1, N: 65, K: 64, wg: 'q4_0', wu: 'q8_0', matvec: 'split-k' },
    { M: 1, N: 65, K: 64, wg: 'q4_0', wu: 'q8_0', matvec: 'rows' },
    { M: 3, N: 64, K: 96, wg: 'q8_0', wu: 'f16', matvec: 'split-k' },
    { M: 4, N: 7, K: 63, wg: 'f32', wu: 'f16', matvec: 'rows' },
  ];
  for (const g of glus) {
    const name = `M=${g.M} N=${g.N} K=${g.K} gate:${g.wg} up:${g.wu}${g.matvec ? ` matvec ${g.matvec}` : ''}`;
    // The matvec kernels stage nothing: once, on the adapter's own context.
    for (const s of stagingsFor(!g.matvec))
      tableIt(`${name}${s.suffix}`, async () => {
        const ctx = s.gpu();
        const seed = g.M * 7 + g.N + g.K;
        const x = randomArray(g.M * g.K, seed, 1);
        const wg = asStored(randomArray(g.N * g.K, seed + 1, 1), g.wg);
        const wu = asStored(randomArray(g.N * g.K, seed + 2, 1), g.wu);
        const gate = matmulRef(x, wg, g.M, g.K, g.N, { transB: true });
        const up = matmulRef(x, wu, g.M, g.K, g.N, { transB: true });
        const act = siluMulForwardRef(gate, up).out;
        const got = await gpuCase(ctx, name, async () => {
          const tx = tensorFromData(ctx, x, [g.M, g.K], 'f32', 'x');
          const twg = tensorFromData(ctx, wg, [g.N, g.K], g.wg, 'w_gate');
          const twu = tensorFromData(ctx, wu, [g.N, g.K], g.wu, 'w_up');
          const tg = createTensor(ctx, [g.M, g.N], 'f32', 'gate');
          const tu = createTensor(ctx, [g.M, g.N], 'f32', 'up');
          const ta = createTensor(ctx, [g.M, g.N], 'f32', 'act');
          const d = await planMatmul(ctx, tx, twg, tg, { glu: { w: twu, up: tu, act: ta }, matvecVariant: g.matvec });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = { gate: await readFloat32(tg), up: await readFloat32(tu), act: await readFloat32(ta) };
          d.dispose();
          for (const t of [tx, twg, twu, tg, tu, ta]) t.dispose();
          return out;
        });
        const tol = 2e-5 * Math.sqrt(g.K);
        expectClose(ctx, `${name} gate`, got.gate, gate, tol, 1e-5);
        expectClose(ctx, `${name} up`, got.up, up, tol, 1e-5);
        expectClose(ctx, `${name} act`, got.act, act, 2 * tol, 1e-5);
      });
  }
});

// matmul_resid: C = x·Wᵀ (+ bias, + the low-rank term) + a residual read from its own buffer, C's
// old contents ignored (C starts as NaN).
describe('residual from another buffer', () => {
  const cases: { M: number; N: number; K: number; w: DType; rank: number; bias: boolean; transW: boolean }[] = [
    { M: 65, N: 63, K: 64, w: 'f16', rank: 4, bias: false, transW: true },
    { M: 9, N: 257, K: 96, w: 'q8_0', rank: 0, bias: true, transW: true },
    { M: 33, N: 20, K: 7, w: 'f32', rank: 3, bias: true, transW: false },
  ];
  for (const r of cases) {
    const name = `M=${r.M} N=${r.N} K=${r.K} W:${r.w}${r.transW ? 'ᵀ' : ''}${r.rank ? ` +rank ${r.rank}` : ''}${r.bias ? ' +bias' : ''}`;
    for (const s of stagings)
      tableIt(`${name} (${s.name})`, async () => {
        const ctx = s.gpu();
        const seed = r.M * 11 + r.N + r.K;
        const x = randomArray(r.M * r.K, seed);
        const w = asStored(randomArray(r.N * r.K, seed + 1), r.w);
        const bias = randomArray(r.N, seed + 2);
        const a2 = randomArray(r.M * r.rank, seed + 3);
        const b2 = randomArray(r.N * r.rank, seed + 4);
        const res = randomArray(r.M * r.N, seed + 5);
        let want = matmulRef(x, w, r.M, r.K, r.N, { transB: r.transW });
        if (r.rank) want = addRef(want, matmulRef(a2, b2, r.M, r.rank, r.N, { transB: r.transW }), 0.5);
        if (r.bias) want = want.map((v, i) => v + (bias[i % r.N] as number));
        want = addRef(want, res);
        const got = await gpuCase(ctx, name, async () => {
          const tx = tensorFromData(ctx, x, [r.M, r.K], 'f32', 'x');
          const tw = tensorFromData(ctx, w, r.transW ? [r.N, r.K] : [r.K, r.N], r.w, 'w');
          const tb = tensorFromData(ctx, bias, [r.N], 'f32', 'bias');
          const ta2 = r.rank ? tensorFromData(ctx, a2, [r.M, r.rank], 'f32', 'a2') : undefined;
          const tb2 = r.rank
            ? tensorFromData(ctx, b2, r.transW ? [r.N, r.rank] : [r.rank, r.N], 'f32', 'b2')
            : undefined;
          const tres = tensorFromData(ctx, res, [r.M, r.N], 'f32', 'residual');
          const tc = tensorFromData(ctx, new Float32Array(r.M * r.N).fill(Number.NaN), [r.M, r.N], 'f32', 'c');
          const d = await planMatmul(ctx, tx, tw, tc, {
            transW: r.transW,
            bias: r.bias ? tb : undefined,
            lowRank: ta2 && tb2 ? { a2: ta2, b2: tb2, alpha2: 0.5 } : undefined,
            residual: tres,
          });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = await readFloat32(tc);
          d.dispose();
          for (const t of [tx, tw, tb, ta2, tb2, tres, tc]) t?.dispose();
          return out;
        });
        expectClose(ctx, name, got, want, 2e-5 * Math.sqrt(r.K + r.rank), 1e-5);
      });
  }

  it('is refused with beta, another epilogue, few rows or a residual of the wrong size', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'residual refusals', async () => {
      const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const [x1, x9, w, c1, c9, r9, small] = [
        t([1, 8], 'x1'),
        t([9, 8], 'x9'),
        t([4, 8], 'w'),
        t([1, 4], 'c1'),
        t([9, 4], 'c9'),
        t([9, 4], 'r9'),
        t([4], 'small'),
      ];
      await expect(planMatmul(ctx, x9, w, c9, { residual: r9, beta: 1 })).rejects.toThrow(/no beta/);
      await expect(planMatmul(ctx, x1, w, c1, { residual: c1 })).rejects.toThrow(/tiled kernel, more than 4 rows/);
      await expect(planMatmul(ctx, x9, w, c9, { residual: small })).rejects.toThrow(
        /residual small f32\[4\] must be f32 like C/,
      );
      for (const b of [x1, x9, w, c1, c9, r9, small]) b.dispose();
    });
  });
});

// matmul_lora_h: the LoRA forward in one dispatch, h = x·Aᵀ formed from the staged tiles of x and
// stored by the first column of tiles. C and h against float64; several column tiles (N > 64), M
// not a multiple of the tile, K not a multiple of 4 or of TK, ranks not a multiple of 4, and C
// starting as NaN where beta is 0 and h always (neither's old contents may leak in).
describe('LoRA forward with h in the dispatch', () => {
  const cases: { M: number; N: number; K: number; w: DType; rank: number; bias: boolean; beta: number }[] = [
    { M: 65, N: 130, K: 96, w: 'f16', rank: 8, bias: true, beta: 1 },
    { M: 33, N: 257, K: 7, w: 'f32', rank: 3, bias: false, beta: 0 },
    { M: 40, N: 72, K: 64, w: 'f16', rank: 5, bias: false, beta: 1 },
    { M: 130, N: 63, K: 64, w: 'q4_0', rank: 16, bias: true, beta: 0 },
    { M: 5, N: 20, K: 41, w: 'f32', rank: 1, bias: false, beta: 1 },
  ];
  for (const r of cases) {
    const name = `M=${r.M} N=${r.N} K=${r.K} W:${r.w} rank ${r.rank}${r.bias ? ' +bias' : ''}${r.beta ? ' +C' : ''}`;
    tableIt(name, async () => {
      const ctx = gpu();
      const seed = r.M * 7 + r.N + r.K + r.rank;
      const x = randomArray(r.M * r.K, seed);
      const w = asStored(randomArray(r.N * r.K, seed + 1), r.w);
      const bias = randomArray(r.N, seed + 2);
      const la = randomArray(r.rank * r.K, seed + 3);
      const lb = randomArray(r.N * r.rank, seed + 4);
      const c0 = r.beta ? randomArray(r.M * r.N, seed + 5) : new Float32Array(r.M * r.N).fill(Number.NaN);
      const h = matmulRef(x, la, r.M, r.K, r.rank, { transB: true });
      let want = addRef(
        matmulRef(x, w, r.M, r.K, r.N, { transB: true }).map((v) => 1.5 * v),
        matmulRef(h, lb, r.M, r.rank, r.N, { transB: true }),
        0.5,
      );
      if (r.bias) want = want.map((v, i) => v + (bias[i % r.N] as number));
      if (r.beta) want = addRef(want, c0);
      const [gotC, gotH] = await gpuCase(ctx, name, async () => {
        const tx = tensorFromData(ctx, x, [r.M, r.K], 'f32', 'x');
        const tw = tensorFromData(ctx, w, [r.N, r.K], r.w, 'w');
        const tb = tensorFromData(ctx, bias, [r.N], 'f32', 'bias');
        const ta = tensorFromData(ctx, la, [r.rank, r.K], 'f32', 'lora_a');
        const tlb = tensorFromData(ctx, lb, [r.N, r.rank], 'f32', 'lora_b');
        const th = tensorFromData(ctx, new Float32Array(r.M * r.rank).fill(Number.NaN), [r.M, r.rank], 'f32', 'h');
        const tc = tensorFromData(ctx, c0, [r.M, r.N], 'f32', 'c');
        const d = await planMatmul(ctx, tx, tw, tc, {
          alpha: 1.5,
          beta: r.beta,
          bias: r.bias ? tb : undefined,
          lowRank: { a2: th, b2: tlb, alpha2: 0.5, a2From: ta },
        });
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = [await readFloat32(tc), await readFloat32(th)];
        d.dispose();
        for (const t of [tx, tw, tb, ta, tlb, th, tc]) t.dispose();
        return out as [Float32Array, Float32Array];
      });
      expectClose(ctx, `${name} h`, gotH, h, 2e-5 * Math.sqrt(r.K), 1e-5);
      expectClose(ctx, name, gotC, want, 2e-5 * Math.sqrt(r.K + r.rank), 1e-5);
    });
  }

  it('is refused with W untransposed, another epilogue, few rows, a large rank or an A of the wrong shape', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'LoRA h refusals', async () => {
      const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const [x1, x9, w, wt, c1, c9, c9b, h1, h9, a, aWide, b, bt, h9r17, a17, b17] = [
        t([1, 8], 'x1'),
        t([9, 8], 'x9'),
        t([4, 8], 'w'),
        t([8, 4], 'wt'),
        t([1, 4], 'c1'),
        t([9, 4], 'c9'),
        t([9, 4], 'c9b'),
        t([1, 2], 'h1'),
        t([9, 2], 'h9'),
        t([2, 8], 'a'),
        t([2, 9], 'aWide'),
        t([4, 2], 'b'),
        t([2, 4], 'bt'),
        t([9, 17], 'h17'),
        t([17, 8], 'a17'),
        t([4, 17], 'b17'),
      ];
      const lowRank = { a2: h9, b2: b, alpha2: 1, a2From: a };
      await expect(planMatmul(ctx, x9, wt, c9, { transW: false, lowRank: { ...lowRank, b2: bt } })).rejects.toThrow(
        /LoRA's h in the dispatch takes W transposed/,
      );
      await expect(planMatmul(ctx, x9, w, c9, { lowRank, activation: { kind: 'gelu', act: c9b } })).rejects.toThrow(
        /LoRA's h in the dispatch takes W transposed, no row range, and no epilogue but bias, beta or RoPE on C/,
      );
      await expect(planMatmul(ctx, x1, w, c1, { lowRank: { ...lowRank, a2: h1 } })).rejects.toThrow(
        /tiled kernel, more than 4 rows \(got 1\)/,
      );
      await expect(planMatmul(ctx, x9, w, c9, { lowRank: { ...lowRank, a2From: aWide } })).rejects.toThrow(
        /LoRA's A aWide f32\[2, 9\] must be f32 2×8/,
      );
      await expect(
        planMatmul(ctx, x9, w, c9, { lowRank: { a2: h9r17, b2: b17, alpha2: 1, a2From: a17 } }),
      ).rejects.toThrow(/ranks up to 16, got 17/);
      for (const x of [x1, x9, w, wt, c1, c9, c9b, h1, h9, a, aWide, b, bt, h9r17, a17, b17]) x.dispose();
    });
  });
});

// matmul_norm_bwd: dx = d_mid·W with d_mid = d_out + RMSNorm's backward of dn formed as it is
// staged, and stored by the first column of tiles. dx and d_mid against the float64 norm backward
// followed by the float64 product; rows scaled from 1e-3 to 1e3 (so a row given another row's rstd
// or coefficient cannot pass), several column tiles, K not a multiple of 4 or of TK, both layouts
// of W, d_mid and dx starting as NaN.
describe('RMSNorm backward in the prologue of dx', () => {
  const cases: { M: number; N: number; K: number; w: DType; transW: boolean }[] = [
    { M: 65, N: 130, K: 96, w: 'f16', transW: false },
    { M: 33, N: 72, K: 7, w: 'f32', transW: false },
    { M: 130, N: 64, K: 64, w: 'q8_0', transW: true },
    { M: 9, N: 20, K: 41, w: 'f32', transW: true },
    // What training plans: o's dx, W untransposed, K and N multiples of 4 (the aligned loads).
    { M: 65, N: 64, K: 96, w: 'f16', transW: false },
  ];
  for (const r of cases) {
    const name = `M=${r.M} N=${r.N} K=${r.K} W:${r.w}${r.transW ? 'ᵀ' : ''}`;
    tableIt(name, async () => {
      const ctx = gpu();
      const seed = r.M * 3 + r.N + r.K;
      const scale = (i: number) => 10 ** (((i % 7) - 3) / 1);
      const x = randomArray(r.M * r.K, seed).map((v, i) => v * scale(Math.floor(i / r.K)));
      const dn = randomArray(r.M * r.K, seed + 1);
      const dOut = randomArray(r.M * r.K, seed + 2);
      const g = randomArray(r.K, seed + 3).map((v) => 1 + 0.5 * v);
      const w = asStored(randomArray(r.N * r.K, seed + 4), r.w);
      const eps = 1e-5;
      const ref = { rows: r.M, d: r.K, x, w: g, eps };
      const rstd = Float32Array.from(rmsnormForwardRef(ref).rstd);
      const dMid = addRef(dOut, rmsnormBackwardRef(ref, dn).dx);
      const want = matmulRef(dMid, w, r.M, r.K, r.N, { transB: r.transW });
      const got = await gpuCase(ctx, name, async () => {
        const t = (data: ArrayLike<number>, shape: number[], label: string) =>
          tensorFromData(ctx, Float32Array.from(data), shape, 'f32', label);
        const nan = (label: string, n: number) => t(new Float32Array(r.M * n).fill(Number.NaN), [r.M, n], label);
        const tOut = t(dOut, [r.M, r.K], 'd_out');
        const tw = tensorFromData(ctx, w, r.transW ? [r.N, r.K] : [r.K, r.N], r.w, 'w');
        const tdn = t(dn, [r.M, r.K], 'dn');
        const tx = t(x, [r.M, r.K], 'mid');
        const tg = t(g, [r.K], 'gain');
        const trstd = t(rstd, [r.M], 'rstd');
        const tmid = nan('d_mid', r.K);
        const tc = nan('dx', r.N);
        const d = await planMatmul(ctx, tOut, tw, tc, {
          transW: r.transW,
          normBackward: { dn: tdn, x: tx, w: tg, rstd: trstd, dMid: tmid },
        });
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = { dx: await readFloat32(tc), dMid: await readFloat32(tmid) };
        d.dispose();
        for (const b of [tOut, tw, tdn, tx, tg, trstd, tmid, tc]) b.dispose();
        return out;
      });
      expectClose(ctx, `${name} d_mid`, got.dMid, dMid, 1e-5, 1e-5);
      // Rows of 1e3 and 1e-3 cancel in dx: bound each element by f32 rounding of its own terms,
      // Σ_k |d_mid·W|, rather than by its (possibly small) value.
      const terms = matmulRef(
        dMid.map((v) => Math.abs(v)),
        Float64Array.from(w, (v) => Math.abs(v)),
        r.M,
        r.K,
        r.N,
        { transB: r.transW },
      );
      let worst = 0;
      for (let i = 0; i < want.length; i++) {
        const bound = 1e-6 * Math.sqrt(r.K) * (terms[i] as number) + 1e-6;
        worst = Math.max(worst, Math.abs((got.dx[i] as number) - (want[i] as number)) / bound);
      }
      expect(worst, `${name} dx: worst error over its bound`).toBeLessThanOrEqual(1);
    });
  }

  it('is refused with d_mid on a buffer the dispatch reads or writes, f16 tiles, an epilogue or few rows', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'norm backward refusals', async () => {
      const [M, K, N] = [8, 16, 12];
      const rows = (label: string) => createTensor(ctx, [M, K], 'f32', label);
      const [dOut, dn, x, dMid] = ['d_out', 'dn', 'mid', 'd_mid'].map(rows) as [Tensor, Tensor, Tensor, Tensor];
      const w = createTensor(ctx, [K, N], 'f16', 'w');
      const c = createTensor(ctx, [M, N], 'f32', 'dx');
      const cWide = createTensor(ctx, [M, K], 'f32', 'dx wide');
      const gain = createTensor(ctx, [K], 'f32', 'gain');
      const rstd = createTensor(ctx, [M], 'f32', 'rstd');
      const nb = { dn, x, w: gain, rstd, dMid };
      try {
        const plan = (opts: MatmulOptions, a = dOut, out = c, wt = w) =>
          planMatmul(ctx, a, wt, out, { transW: false, ...opts });
        for (const alias of [dOut, dn, x])
          await expect(plan({ normBackward: { ...nb, dMid: alias } })).rejects.toThrow(/must be another buffer/);
        // C written beside d_mid: WebGPU itself would accept the two writable bindings.
        const square = createTensor(ctx, [K, K], 'f16', 'w square');
        await expect(plan({ normBackward: { ...nb, dMid: cWide } }, dOut, cWide, square)).rejects.toThrow(
          /which it writes/,
        );
        square.dispose();
        // f16 tiles: refused by the prologue, or first by an adapter without shader-f16.
        await expect(plan({ normBackward: nb, tileMath: 'f16' })).rejects.toThrow(/f32 only|shader-f16/);
        await expect(plan({ normBackward: nb, beta: 1 })).rejects.toThrow(/no bias, beta/);
        await expect(plan({ normBackward: { ...nb, rstd: gain } })).rejects.toThrow(/rstd/);
        // Two rows of x·Wᵀ take the matrix-vector kernel, which has no prologue.
        const few = ['d_out 2', 'dn 2', 'mid 2', 'd_mid 2'].map((l) => createTensor(ctx, [2, K], 'f32', l));
        const [fOut, fdn, fx, fMid] = few as [Tensor, Tensor, Tensor, Tensor];
        const fRstd = createTensor(ctx, [2], 'f32', 'rstd 2');
        const fC = createTensor(ctx, [2, N], 'f32', 'dx 2');
        const wT = createTensor(ctx, [N, K], 'f16', 'w transposed');
        await expect(
          planMatmul(ctx, fOut, wT, fC, { normBackward: { dn: fdn, x: fx, w: gain, rstd: fRstd, dMid: fMid } }),
        ).rejects.toThrow(/tiled kernel/);
        for (const t of [...few, fRstd, fC, wT]) t.dispose();
      } finally {
        for (const t of [dOut, dn, x, dMid, w, c, cWide, gain, rstd]) t.dispose();
      }
    });
  });
});

// matmul_glu_norm: the gated MLP on RMSNorm(x), the norm inside the dispatch: gate, up, act and the
// norm's rstd against the float64 norm followed by the float64 products. Rows of very different
// scales (1e-3 to 1e3) so that a row given another row's rstd, or none, cannot pass; M not a
// multiple of the tile, K not a multiple of 4 or of TK.
// matmul_glu_bwd: the dx of an unadapted gated MLP's gate and up from ∂L/∂act, silu·mul's backward
// formed as the tiles are staged (what training plans where the down projection's dx takes the next
// layer's norm backward).
describe("gated MLP's dx through its backward in the prologue", () => {
  const cases: { M: number; N: number; K: number; w: DType; w3: DType; transW: boolean }[] = [
    // What training plans: W untransposed (K = intermediate, N = hidden), f16, multiples of 4.
    { M: 65, N: 64, K: 96, w: 'f16', w3: 'f16', transW: false },
    { M: 33, N: 30, K: 7, w: 'f32', w3: 'f16', transW: false },
    { M: 9, N: 21, K: 41, w: 'f32', w3: 'f32', transW: true },
    { M: 130, N: 64, K: 64, w: 'q8_0', w3: 'q4_0', transW: true },
  ];
  for (const r of cases) {
    const name = `M=${r.M} N=${r.N} K=${r.K} W:${r.w} W3:${r.w3}${r.transW ? 'ᵀ' : ''}`;
    tableIt(name, async () => {
      const ctx = gpu();
      const seed = r.M * 5 + r.N + r.K;
      const dAct = randomArray(r.M * r.K, seed);
      const gate = randomArray(r.M * r.K, seed + 1, 3);
      const up = randomArray(r.M * r.K, seed + 2, 2);
      const wShape = r.transW ? [r.N, r.K] : [r.K, r.N];
      const w = asStored(randomArray(r.N * r.K, seed + 3), r.w);
      const w3 = asStored(randomArray(r.N * r.K, seed + 4), r.w3);
      const { dgate, dup } = siluMulBackwardRef(gate, up, dAct);
      const opts = { transB: r.transW };
      const want = addRef(matmulRef(dgate, w, r.M, r.K, r.N, opts), matmulRef(dup, w3, r.M, r.K, r.N, opts));
      const got = await gpuCase(ctx, name, async () => {
        const t = (data: ArrayLike<number>, label: string) =>
          tensorFromData(ctx, Float32Array.from(data), [r.M, r.K], 'f32', label);
        const ta = t(dAct, 'd_act');
        const tg = t(gate, 'gate');
        const tu = t(up, 'up');
        const tw = tensorFromData(ctx, w, wShape, r.w, 'w_gate');
        const tw3 = tensorFromData(ctx, w3, wShape, r.w3, 'w_up');
        const tc = tensorFromData(ctx, new Float32Array(r.M * r.N).fill(Number.NaN), [r.M, r.N], 'f32', 'dx');
        const d = await planMatmul(ctx, ta, tw, tc, { transW: r.transW, gluBackward: { gate: tg, up: tu, w3: tw3 } });
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = await readFloat32(tc);
        d.dispose();
        for (const b of [ta, tg, tu, tw, tw3, tc]) b.dispose();
        return out;
      });
      expectClose(ctx, `${name} dx`, got, want, 4e-5 * Math.sqrt(r.K), 1e-5);
    });
  }

  it('is refused with another epilogue, beta, f16 tiles, few rows or operands of the wrong shape', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'glu backward refusals', async () => {
      const [M, N, K] = [65, 8, 12];
      const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const a = t([M, K], 'd_act');
      const gate = t([M, K], 'gate');
      const up = t([M, K], 'up');
      const w = t([K, N], 'w');
      const w3 = t([K, N], 'w3');
      const c = t([M, N], 'c');
      const small = t([4, K], 'few');
      const cSmall = t([4, N], 'c few');
      const wrong = t([N, K], 'w3 transposed');
      const gb = { gate, up, w3 };
      const plan = (opts: object, x = a, out = c) => planMatmul(ctx, x, w, out, { transW: false, ...opts });
      try {
        await expect(plan({ gluBackward: gb, beta: 1 })).rejects.toThrow(/no bias, beta/);
        await expect(plan({ gluBackward: gb, tileMath: 'f16' })).rejects.toThrow(/f32 only|shader-f16|f16 tile/);
        await expect(plan({ gluBackward: { ...gb, w3: wrong } })).rejects.toThrow(/up's weight w3 transposed/);
        await expect(plan({ gluBackward: { ...gb, up: small } })).rejects.toThrow(/up few .*like A/);
        // W transposed: there M ≤ MATVEC_MAX_ROWS takes the matrix-vector kernel.
        await expect(
          planMatmul(ctx, small, wrong, cSmall, { gluBackward: { gate: small, up: small, w3: wrong } }),
        ).rejects.toThrow(/tiled kernel/);
      } finally {
        for (const b of [a, gate, up, w, w3, c, small, cSmall, wrong]) b.dispose();
      }
    });
  });
});

// matmul_dlogits is checked through the loss (cross_entropy.test.ts: planCrossEntropyTraining's dH
// against the float64 reference); here, what it refuses before anything is queued.
describe("the loss's dz in the prologue", () => {
  it('is refused with another prologue, f16 tiles, operands of the wrong size or a chunk past the vocabulary', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'dlogits refusals', async () => {
      const [M, N, K] = [9, 8, 12];
      const f = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const a = f([M, K], 'logits');
      const w = f([K, N], 'E chunk');
      const c = f([M, N], 'dh');
      const lse = f([M], 'lse');
      const coef = f([4], 'loss');
      const small = f([2], 'loss2');
      const labels = createTensor(ctx, [M], 'i32', 'labels');
      const labelsF = f([M], 'labels f32');
      const h = f([M, 4], 'h');
      const b2 = f([4, N], 'b2');
      const dl = { labels, lse, coef, start: 0, vocab: 100 };
      const plan = (opts: object) => planMatmul(ctx, a, w, c, { transW: false, ...opts });
      try {
        await expect(plan({ dlogits: dl, lowRank: { a2: h, b2, alpha2: 1 } })).rejects.toThrow(/no bias, low-rank/);
        await expect(plan({ dlogits: dl, tileMath: 'f16' })).rejects.toThrow(/f32 only|shader-f16|f16 tile/);
        await expect(plan({ dlogits: { ...dl, coef: small } })).rejects.toThrow(/coef loss2 .*3/);
        await expect(plan({ dlogits: { ...dl, labels: labelsF } })).rejects.toThrow(/labels labels f32 .*i32/);
        await expect(plan({ dlogits: { ...dl, lse: coef } })).rejects.toThrow(/lse loss/);
        await expect(plan({ dlogits: { ...dl, start: 90 } })).rejects.toThrow(/\[90, 102\) .*vocabulary of 100/);
        const ok = await plan({ dlogits: dl, beta: 1 });
        ok.dispose();
      } finally {
        for (const x of [a, w, c, lse, coef, small, labels, labelsF, h, b2]) x.dispose();
      }
    });
  });
});

describe('gated MLP behind its RMSNorm in one dispatch', () => {
  const cases: { M: number; N: number; K: number; wg: DType; wu: DType }[] = [
    { M: 65, N: 63, K: 64, wg: 'f32', wu: 'f16' },
    { M: 5, N: 257, K: 65, wg: 'f16', wu: 'f32' },
    { M: 130, N: 64, K: 96, wg: 'q8_0', wu: 'q4_0' },
    { M: 33, N: 20, K: 7, wg: 'f32', wu: 'f32' },
  ];
  for (const g of cases) {
    const name = `M=${g.M} N=${g.N} K=${g.K} gate:${g.wg} up:${g.wu}`;
    tableIt(name, async () => {
      const ctx = gpu();
      const seed = g.M * 5 + g.N + g.K;
      const x = randomArray(g.M * g.K, seed, 1);
      for (let r = 0; r < g.M; r++) {
        const scale = 10 ** ((r % 7) - 3);
        for (let k = 0; k < g.K; k++) x[r * g.K + k] = (x[r * g.K + k] as number) * scale;
      }
      const gain = randomArray(g.K, seed + 3, 1);
      const eps = 1e-5;
      const wg = asStored(randomArray(g.N * g.K, seed + 1, 1), g.wg);
      const wu = asStored(randomArray(g.N * g.K, seed + 2, 1), g.wu);
      const norm = rmsnormForwardRef({ rows: g.M, d: g.K, x, w: gain, eps });
      const gate = matmulRef(norm.y, wg, g.M, g.K, g.N, { transB: true });
      const up = matmulRef(norm.y, wu, g.M, g.K, g.N, { transB: true });
      const act = siluMulForwardRef(gate, up).out;
      const got = await gpuCase(ctx, name, async () => {
        const tx = tensorFromData(ctx, x, [g.M, g.K], 'f32', 'x');
        const tn = tensorFromData(ctx, gain, [g.K], 'f32', 'norm.w');
        const twg = tensorFromData(ctx, wg, [g.N, g.K], g.wg, 'w_gate');
        const twu = tensorFromData(ctx, wu, [g.N, g.K], g.wu, 'w_up');
        const tr = createTensor(ctx, [g.M], 'f32', 'rstd');
        const tg = createTensor(ctx, [g.M, g.N], 'f32', 'gate');
        const tu = createTensor(ctx, [g.M, g.N], 'f32', 'up');
        const ta = createTensor(ctx, [g.M, g.N], 'f32', 'act');
        const d = await planMatmul(ctx, tx, twg, tg, {
          glu: { w: twu, up: tu, act: ta },
          norm: { w: tn, rstd: tr, eps },
        });
        new StepEncoder(ctx, name).dispatch(d).submit();
        const out = {
          gate: await readFloat32(tg),
          up: await readFloat32(tu),
          act: await readFloat32(ta),
          rstd: await readFloat32(tr),
        };
        d.dispose();
        for (const t of [tx, tn, twg, twu, tr, tg, tu, ta]) t.dispose();
        return out;
      });
      const tol = 2e-5 * Math.sqrt(g.K);
      expectClose(ctx, `${name} rstd`, got.rstd, norm.rstd, 0, 1e-5);
      expectClose(ctx, `${name} gate`, got.gate, gate, tol, 1e-5);
      expectClose(ctx, `${name} up`, got.up, up, tol, 1e-5);
      expectClose(ctx, `${name} act`, got.act, act, 2 * tol, 1e-5);
    });
  }

  it('is refused where the tiled kernel does not run, or with operands of the wrong size', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'norm refusals', async () => {
      const make = (M: number) => ({
        x: createTensor(ctx, [M, 8], 'f32', 'x'),
        w: createTensor(ctx, [4, 8], 'f32', 'w'),
        c: createTensor(ctx, [M, 4], 'f32', 'gate'),
        up: createTensor(ctx, [M, 4], 'f32', 'up'),
        act: createTensor(ctx, [M, 4], 'f32', 'act'),
        g: createTensor(ctx, [8], 'f32', 'norm.w'),
        rstd: createTensor(ctx, [M], 'f32', 'rstd'),
      });
      const one = make(1);
      const many = make(9);
      const plan = (
        t: ReturnType<typeof make>,
        over: Partial<{ g: typeof t.g; rstd: typeof t.rstd; glu: boolean }> = {},
      ) =>
        planMatmul(ctx, t.x, t.w, t.c, {
          ...(over.glu === false ? {} : { glu: { w: t.w, up: t.up, act: t.act } }),
          norm: { w: over.g ?? t.g, rstd: over.rstd ?? t.rstd, eps: 1e-6 },
        });
      await expect(plan(one)).rejects.toThrow(/tiled kernel, more than 4 rows \(got 1\)/);
      await expect(plan(many, { glu: false })).rejects.toThrow(/gated MLP/);
      await expect(plan(many, { rstd: one.rstd })).rejects.toThrow(/rstd rstd f32\[1\] must be 9 f32 values/);
      await expect(plan(many, { g: many.rstd })).rejects.toThrow(/gain rstd f32\[9\] must be 8 f32 values/);
      for (const t of [...Object.values(one), ...Object.values(many)]) t.dispose();
    });
  });
});

// matmul_pair / matvec_pair: C = x·Wᵀ + alpha2·A2·B2ᵀ and out = x·W3ᵀ from one dispatch (q with
// its LoRA term beside an unadapted k), the weights in different storage formats.
describe('two projections in one dispatch', () => {
  const pairs: { M: number; N: number; K: number; w: DType; w3: DType; rank: number; matvec?: MatvecVariant }[] = [
    { M: 65, N: 63, K: 64, w: 'f16', w3: 'f32', rank: 7 },
    { M: 257, N: 96, K: 32, w: 'q8_0', w3: 'q4_0', rank: 0 },
    { M: 7, N: 65, K: 65, w: 'f32', w3: 'f16', rank: 1 },
    { M: 1, N: 65, K: 96, w: 'q4_0', w3: 'f16', rank: 8, matvec: 'split-k' },
    { M: 2, N: 63, K: 64, w: 'f16', w3: 'q8_0', rank: 4, matvec: 'rows' },
  ];
  for (const c of pairs) {
    const name = `M=${c.M} N=${c.N} K=${c.K} W:${c.w} W3:${c.w3}${c.rank ? ` +rank ${c.rank}` : ''}${c.matvec ? ` matvec ${c.matvec}` : ''}`;
    for (const s of stagingsFor(!c.matvec))
      tableIt(`${name}${s.suffix}`, async () => {
        const ctx = s.gpu();
        const seed = c.M * 3 + c.N + c.K;
        const x = randomArray(c.M * c.K, seed);
        const w = asStored(randomArray(c.N * c.K, seed + 1), c.w);
        const w3 = asStored(randomArray(c.N * c.K, seed + 2), c.w3);
        const a2 = randomArray(c.M * c.rank, seed + 3);
        const b2 = randomArray(c.N * c.rank, seed + 4);
        const alpha2 = 2;
        let first = matmulRef(x, w, c.M, c.K, c.N, { transB: true });
        if (c.rank) first = addRef(first, matmulRef(a2, b2, c.M, c.rank, c.N, { transB: true }), alpha2);
        const second = matmulRef(x, w3, c.M, c.K, c.N, { transB: true });
        const got = await gpuCase(ctx, name, async () => {
          const tx = tensorFromData(ctx, x, [c.M, c.K], 'f32', 'x');
          const tw = tensorFromData(ctx, w, [c.N, c.K], c.w, 'w');
          const tw3 = tensorFromData(ctx, w3, [c.N, c.K], c.w3, 'w3');
          const ta2 = c.rank ? tensorFromData(ctx, a2, [c.M, c.rank], 'f32', 'a2') : undefined;
          const tb2 = c.rank ? tensorFromData(ctx, b2, [c.N, c.rank], 'f32', 'b2') : undefined;
          const tc = createTensor(ctx, [c.M, c.N], 'f32', 'c');
          const tout = createTensor(ctx, [c.M, c.N], 'f32', 'out');
          const d = await planMatmul(ctx, tx, tw, tc, {
            lowRank: ta2 && tb2 ? { a2: ta2, b2: tb2, alpha2 } : undefined,
            second: { w: tw3, out: tout },
            matvecVariant: c.matvec,
          });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = { first: await readFloat32(tc), second: await readFloat32(tout) };
          d.dispose();
          for (const t of [tx, tw, tw3, ta2, tb2, tc, tout]) t?.dispose();
          return out;
        });
        expectClose(ctx, `${name} C`, got.first, first, 2e-5 * Math.sqrt(c.K + c.rank), 1e-5);
        expectClose(ctx, `${name} second`, got.second, second, 2e-5 * Math.sqrt(c.K), 1e-5);
      });
  }
});

// The RoPE epilogue (matmul_rope, matvec_rope and the pairs): the product as above, then
// ropeForwardRef on the outputs it rotates; heads of several sizes against tiles of 32 and 64
// columns, a bias, the low-rank term, unaligned K, quantized weights and an attention scaling.
describe('RoPE epilogue', () => {
  const ropeCases: {
    M: number;
    T: number;
    pos0: number;
    hd: number;
    heads: number;
    K: number;
    w: DType;
    rank: number;
    bias?: boolean;
    pair?: { w3: DType; c: boolean; second: boolean };
    matvec?: MatvecVariant;
    /** LoRA's h formed in the dispatch (matmul_lora_h_rope): A2 = x·Aᵀ, checked too. */
    hIn?: boolean;
  }[] = [
    { M: 65, T: 13, pos0: 5, hd: 8, heads: 3, K: 65, w: 'f16', rank: 7, bias: true },
    { M: 70, T: 35, pos0: 0, hd: 64, heads: 2, K: 64, w: 'q8_0', rank: 0 },
    { M: 65, T: 13, pos0: 5, hd: 8, heads: 3, K: 65, w: 'f16', rank: 7, bias: true, hIn: true },
    { M: 70, T: 35, pos0: 0, hd: 64, heads: 2, K: 64, w: 'q8_0', rank: 8, hIn: true },
    { M: 40, T: 40, pos0: 1000, hd: 128, heads: 1, K: 32, w: 'f32', rank: 8, bias: true },
    { M: 4, T: 2, pos0: 100, hd: 32, heads: 3, K: 64, w: 'f32', rank: 4, matvec: 'rows' },
    { M: 1, T: 1, pos0: 7, hd: 16, heads: 4, K: 40, w: 'f16', rank: 0, bias: true, matvec: 'split-k' },
    { M: 33, T: 11, pos0: 2, hd: 16, heads: 3, K: 64, w: 'f16', rank: 8, pair: { w3: 'q8_0', c: true, second: true } },
    { M: 65, T: 65, pos0: 0, hd: 64, heads: 1, K: 36, w: 'f32', rank: 4, pair: { w3: 'f16', c: false, second: true } },
    { M: 66, T: 33, pos0: 3, hd: 32, heads: 2, K: 64, w: 'q4_0', rank: 0, pair: { w3: 'f32', c: true, second: false } },
    {
      M: 2,
      T: 2,
      pos0: 9,
      hd: 8,
      heads: 5,
      K: 64,
      w: 'f32',
      rank: 2,
      pair: { w3: 'f16', c: false, second: true },
      matvec: 'rows',
    },
  ];
  for (const c of ropeCases) {
    const N = c.hd * c.heads;
    const rotated = c.pair ?? { c: true, second: false };
    const name =
      `M=${c.M} (T=${c.T}, from ${c.pos0}) ${c.heads}×${c.hd} K=${c.K} W:${c.w}` +
      `${c.rank ? ` +rank ${c.rank}` : ''}${c.bias ? ' +bias' : ''}` +
      `${c.pair ? ` pair W3:${c.pair.w3} rotating ${[c.pair.c ? 'C' : '', c.pair.second ? 'second' : ''].filter(Boolean).join(', ')}` : ''}` +
      `${c.matvec ? ` matvec ${c.matvec}` : ''}${c.hIn ? ' h in the dispatch' : ''}`;
    for (const s of stagingsFor(!c.hIn && !c.matvec))
      tableIt(`${name}${s.suffix}`, async () => {
        const ctx = s.gpu();
        const seed = c.M * 5 + N + c.K;
        const x = randomArray(c.M * c.K, seed);
        const w = asStored(randomArray(N * c.K, seed + 1), c.w);
        const w3 = asStored(randomArray(N * c.K, seed + 2), c.pair?.w3 ?? 'f32');
        const la = randomArray(c.rank * c.K, seed + 6);
        const a2 = c.hIn ? matmulRef(x, la, c.M, c.K, c.rank, { transB: true }) : randomArray(c.M * c.rank, seed + 3);
        const b2 = randomArray(N * c.rank, seed + 4);
        const bias = randomArray(N, seed + 5);
        const invFreq = Float32Array.from({ length: c.hd / 2 }, (_, i) => 10000 ** (-(2 * i) / c.hd));
        const scaling = 0.75;
        const alpha2 = 2;
        let first = matmulRef(x, w, c.M, c.K, N, { transB: true });
        if (c.rank) first = addRef(first, matmulRef(a2, b2, c.M, c.rank, N, { transB: true }), alpha2);
        if (c.bias) first = first.map((v, i) => v + (bias[i % N] as number));
        let second = matmulRef(x, w3, c.M, c.K, N, { transB: true });
        const rope = (v: ArrayLike<number>) =>
          ropeForwardRef({
            rows: c.M,
            T: c.T,
            pos0: c.pos0,
            nHeads: c.heads,
            headDim: c.hd,
            invFreq,
            attentionScaling: scaling,
            x: v,
          }).y;
        if (rotated.c) first = rope(first);
        if (rotated.second) second = rope(second);
        const got = await gpuCase(ctx, name, async () => {
          const tx = tensorFromData(ctx, x, [c.M, c.K], 'f32', 'x');
          const tw = tensorFromData(ctx, w, [N, c.K], c.w, 'w');
          const tw3 = c.pair ? tensorFromData(ctx, w3, [N, c.K], c.pair.w3, 'w3') : undefined;
          const ta2 = c.rank
            ? c.hIn
              ? tensorFromData(ctx, new Float32Array(c.M * c.rank).fill(Number.NaN), [c.M, c.rank], 'f32', 'h')
              : tensorFromData(ctx, a2, [c.M, c.rank], 'f32', 'a2')
            : undefined;
          const tla = c.hIn ? tensorFromData(ctx, la, [c.rank, c.K], 'f32', 'lora_a') : undefined;
          const tb2 = c.rank ? tensorFromData(ctx, b2, [N, c.rank], 'f32', 'b2') : undefined;
          const tbias = c.bias ? tensorFromData(ctx, bias, [N], 'f32', 'bias') : undefined;
          const tfreq = tensorFromData(ctx, invFreq, [c.hd / 2], 'f32', 'inv_freq');
          const tc = createTensor(ctx, [c.M, N], 'f32', 'c');
          const tout = tw3 ? createTensor(ctx, [c.M, N], 'f32', 'out') : undefined;
          const d = await planMatmul(ctx, tx, tw, tc, {
            lowRank: ta2 && tb2 ? { a2: ta2, b2: tb2, alpha2, ...(tla ? { a2From: tla } : {}) } : undefined,
            bias: tbias,
            second: tw3 && tout ? { w: tw3, out: tout } : undefined,
            rope: { invFreq: tfreq, headDim: c.hd, T: c.T, pos0: c.pos0, scaling, ...rotated },
            matvecVariant: c.matvec,
          });
          new StepEncoder(ctx, name).dispatch(d).submit();
          const out = {
            first: await readFloat32(tc),
            second: tout ? await readFloat32(tout) : undefined,
            h: tla && ta2 ? await readFloat32(ta2) : undefined,
          };
          d.dispose();
          for (const t of [tx, tw, tw3, ta2, tb2, tla, tbias, tfreq, tc, tout]) t?.dispose();
          return out;
        });
        if (got.h) expectClose(ctx, `${name} h`, got.h, a2, 2e-5 * Math.sqrt(c.K), 1e-5);
        expectClose(ctx, `${name} C`, got.first, first, 2e-5 * Math.sqrt(c.K + c.rank), 1e-5);
        if (got.second) expectClose(ctx, `${name} second`, got.second, second, 2e-5 * Math.sqrt(c.K), 1e-5);
      });
  }

  it('refuses what the epilogue cannot do, naming it, before anything is queued', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'rope refusals', async () => {
      const x = createTensor(ctx, [8, 16], 'f32', 'x');
      const w = createTensor(ctx, [24, 16], 'f32', 'w');
      const c = createTensor(ctx, [8, 24], 'f32', 'c');
      const freq = createTensor(ctx, [4], 'f32', 'inv_freq');
      const rope = { invFreq: freq, headDim: 8, T: 8, c: true, second: false };
      try {
        // 24 columns are not whole heads of 16; a head of 6 is not a multiple of 4.
        await expect(planMatmul(ctx, x, w, c, { rope: { ...rope, headDim: 16 } })).rejects.toThrow(/head size/);
        await expect(planMatmul(ctx, x, w, c, { rope: { ...rope, headDim: 6 } })).rejects.toThrow(/head size/);
        await expect(planMatmul(ctx, x, w, c, { rope, beta: 1 })).rejects.toThrow(ShapeError);
        // 8 rows are not whole sequences of 3.
        await expect(planMatmul(ctx, x, w, c, { rope: { ...rope, T: 3 } })).rejects.toThrow(/whole number/);
        await expect(planMatmul(ctx, x, w, c, { rope: { ...rope, c: false, second: true } })).rejects.toThrow(/second/);
        const short = createTensor(ctx, [3], 'f32', 'short');
        await expect(planMatmul(ctx, x, w, c, { rope: { ...rope, invFreq: short } })).rejects.toThrow(/inv_freq/);
        short.dispose();
      } finally {
        for (const t of [x, w, c, freq]) t.dispose();
      }
    });
  });
});

// matmul_qkv: q, k and v of one input in one dispatch, each with its own weight format and LoRA
// term (h and B places of one buffer each), and RoPE on q and k; q, k and v are places of one
// NaN-filled buffer in any order, and nothing outside them may be written.
describe('q, k and v in one dispatch', () => {
  interface Qkv {
    M: number;
    K: number;
    widths: [number, number, number];
    w: [DType, DType, DType];
    /** LoRA rank of q, k and v (0: none). */
    ranks: [number, number, number];
    rope?: { hd: number; T: number; pos0: number };
    /** The order of q, k and v in their buffer. */
    order: [number, number, number];
  }
  // Widths are whole GPU tiles (64 columns) but in the last case, whose 24 and 40 take tiles 8 wide.
  const qkvCases: Qkv[] = [
    // What training plans (SmolLM2 at a small scale): q and v adapted, RoPE, f16 weights.
    {
      M: 64,
      K: 64,
      widths: [192, 64, 64],
      w: ['f16', 'f16', 'f16'],
      ranks: [8, 0, 8],
      rope: { hd: 64, T: 32, pos0: 0 },
      order: [0, 1, 2],
    },
    // No adapter, no RoPE, three storage formats, rows not a whole tile.
    { M: 65, K: 64, widths: [192, 64, 128], w: ['q8_0', 'q4_0', 'f32'], ranks: [0, 0, 0], order: [2, 0, 1] },
    // k and v adapted at unaligned ranks, K unaligned, RoPE from position 3 on heads of 32.
    {
      M: 65,
      K: 36,
      widths: [128, 64, 64],
      w: ['f32', 'f16', 'f32'],
      ranks: [0, 3, 5],
      rope: { hd: 32, T: 13, pos0: 3 },
      order: [1, 2, 0],
    },
    // All three adapted (all-linear), places in reverse order.
    { M: 20, K: 96, widths: [128, 128, 64], w: ['f16', 'q8_0', 'f16'], ranks: [16, 8, 4], order: [2, 1, 0] },
    // A small model's widths (48, 24, 40): narrower tiles; q and k adapted, RoPE on heads of 8.
    {
      M: 24,
      K: 32,
      widths: [48, 24, 40],
      w: ['f32', 'f16', 'q8_0'],
      ranks: [4, 2, 0],
      rope: { hd: 8, T: 12, pos0: 0 },
      order: [0, 1, 2],
    },
  ];
  for (const c of qkvCases) {
    const names = ['q', 'k', 'v'];
    const name =
      `M=${c.M} K=${c.K} q|k|v ${c.widths.join('|')} W:${c.w.join('/')} ranks ${c.ranks.join('/')}` +
      `${c.rope ? ` RoPE heads of ${c.rope.hd} (T=${c.rope.T}, from ${c.rope.pos0})` : ''} order ${c.order.map((i) => names[i]).join('')}`;
    tableIt(name, async () => {
      const ctx = gpu();
      const seed = 7 * c.M + c.K + c.widths[0];
      const x = randomArray(c.M * c.K, seed);
      const invFreq = c.rope
        ? Float32Array.from({ length: c.rope.hd / 2 }, (_, i) => 10000 ** (-(2 * i) / (c.rope?.hd ?? 1)))
        : new Float32Array(0);
      const scaling = 0.75;
      const parts = c.widths.map((N, i) => {
        const r = c.ranks[i] as number;
        const w = asStored(randomArray(N * c.K, seed + 10 * i + 1), c.w[i] as DType);
        const h = randomArray(c.M * r, seed + 10 * i + 2);
        const b = randomArray(N * r, seed + 10 * i + 3);
        const scale = 1.5 - i;
        let want = matmulRef(x, w, c.M, c.K, N, { transB: true });
        if (r) want = addRef(want, matmulRef(h, b, c.M, r, N, { transB: true }), scale);
        if (c.rope && i < 2)
          want = ropeForwardRef({
            rows: c.M,
            T: c.rope.T,
            pos0: c.rope.pos0,
            nHeads: N / c.rope.hd,
            headDim: c.rope.hd,
            invFreq,
            attentionScaling: scaling,
            x: want,
          }).y;
        return { N, r, w, h, b, scale, want };
      });
      const got = await gpuCase(ctx, name, async () => {
        const owned: Tensor[] = [];
        const own = (t: Tensor) => {
          owned.push(t);
          return t;
        };
        // Places of one NaN-filled buffer, 256 bytes apart, in the given order.
        const arena = (label: string, sizes: number[], order: readonly number[]) => {
          const bytes = (n: number) => Math.ceil((n * 4) / 256) * 256 + 256;
          const total = sizes.reduce((n, s) => n + bytes(s), 256);
          const buf = own(tensorFromData(ctx, new Float32Array(total / 4).fill(Number.NaN), [total / 4], 'f32', label));
          const at: number[] = [];
          let off = 256;
          for (const i of order) {
            at[i] = off;
            off += bytes(sizes[i] as number);
          }
          return { buf, at };
        };
        const outs = arena(
          'qkv',
          parts.map((p) => c.M * p.N),
          c.order,
        );
        const adapted = [0, 1, 2].filter((i) => c.ranks[i]);
        const hs = arena(
          'h',
          adapted.map((i) => c.M * (c.ranks[i] as number)),
          adapted.map((_, j) => adapted.length - 1 - j),
        );
        const bs = arena(
          'b',
          adapted.map((i) => (parts[i]?.N as number) * (c.ranks[i] as number)),
          adapted.map((_, j) => j),
        );
        const tx = own(tensorFromData(ctx, x, [c.M, c.K], 'f32', 'x'));
        const projection = (i: number): QkvProjection => {
          const p = parts[i] as (typeof parts)[number];
          const out = tensorView(outs.buf, outs.at[i] as number, [c.M, p.N], 'f32', `${names[i]}`);
          const j = adapted.indexOf(i);
          let lora: QkvProjection['lora'];
          if (j >= 0) {
            const h = tensorView(hs.buf, hs.at[j] as number, [c.M, p.r], 'f32', `h_${names[i]}`);
            const b = tensorView(bs.buf, bs.at[j] as number, [p.N, p.r], 'f32', `b_${names[i]}`);
            writeTensor(h, p.h);
            writeTensor(b, p.b);
            lora = { h, b, scale: p.scale };
          }
          return { w: own(tensorFromData(ctx, p.w, [p.N, c.K], c.w[i] as DType, `w_${names[i]}`)), out, lora };
        };
        const freq = c.rope ? own(tensorFromData(ctx, invFreq, [c.rope.hd / 2], 'f32', 'inv_freq')) : undefined;
        const d = await planQkvMatmul(
          ctx,
          tx,
          { q: projection(0), k: projection(1), v: projection(2) },
          c.rope && freq
            ? { rope: { invFreq: freq, headDim: c.rope.hd, T: c.rope.T, pos0: c.rope.pos0, scaling } }
            : {},
        );
        new StepEncoder(ctx, name).dispatch(d).submit();
        const all = await readFloat32(outs.buf);
        d.dispose();
        for (const t of owned) t.dispose();
        return { all, at: outs.at };
      });
      const inside = new Set<number>();
      for (const [i, p] of parts.entries()) {
        const start = (got.at[i] as number) / 4;
        for (let e = 0; e < c.M * p.N; e++) inside.add(start + e);
        const out = got.all.subarray(start, start + c.M * p.N);
        expectClose(ctx, `${name} ${names[i]}`, out, p.want, 2e-5 * Math.sqrt(c.K + p.r), 1e-5);
      }
      const written = [...got.all.keys()].filter((e) => !inside.has(e) && !Number.isNaN(got.all[e]));
      expect(written).toEqual([]);
    });
  }

  it('is refused with few rows, widths not multiples of 4, places in other buffers or overlapping, or a LoRA B of the wrong shape', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'matmul_qkv refusals', async () => {
      const M = 8;
      const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
      const x = t([M, 32], 'x');
      const arena = t([M * 512], 'qkv');
      const view = (off: number, N: number, label: string) => tensorView(arena, off * 4, [M, N], 'f32', label);
      const w = (N: number, label: string) => t([N, 32], label);
      const [wq, wk, wv, wodd] = [w(128, 'wq'), w(64, 'wk'), w(64, 'wv'), w(46, 'w46')];
      const q = { w: wq, out: view(0, 128, 'q') };
      const k = { w: wk, out: view(M * 128, 64, 'k') };
      const v = { w: wv, out: view(M * 256, 64, 'v') };
      const elsewhere = t([M, 64], 'v elsewhere');
      const lora = (N: number, label: string) => ({ h: t([M, 4], `h ${label}`), b: t([N, 4], `b ${label}`), scale: 1 });
      try {
        (await planQkvMatmul(ctx, x, { q, k, v })).dispose(); // as given, it plans
        const few = t([4, 32], 'x4');
        const fewOut = tensorView(arena, 0, [4, 128], 'f32', 'q4');
        await expect(
          planQkvMatmul(ctx, few, {
            q: { w: wq, out: fewOut },
            k: { w: wk, out: tensorView(arena, 4096, [4, 64], 'f32', 'k4') },
            v: { w: wv, out: tensorView(arena, 8192, [4, 64], 'f32', 'v4') },
          }),
        ).rejects.toThrow(/more than 4 rows/);
        few.dispose();
        await expect(planQkvMatmul(ctx, x, { q, k: { w: wodd, out: view(M * 128, 46, 'k46') }, v })).rejects.toThrow(
          /multiples of 4/,
        );
        await expect(planQkvMatmul(ctx, x, { q: k, k: q, v })).rejects.toThrow(/no wider than q/);
        await expect(planQkvMatmul(ctx, x, { q, k, v: { ...v, out: elsewhere } })).rejects.toThrow(
          /q, k and v must be places of one buffer/,
        );
        const [lq, lk, lv] = [lora(128, 'q'), lora(64, 'k'), lora(64, 'v')];
        await expect(
          planQkvMatmul(ctx, x, { q: { ...q, lora: lq }, k: { ...k, lora: { ...lk, b: lq.b } }, v }),
        ).rejects.toThrow(/B b q \[128, 4\] must be f32 8×r and 64×r/);
        await expect(planQkvMatmul(ctx, x, { q: { ...q, lora: lq }, k, v: { ...v, lora: lv } })).rejects.toThrow(
          /the LoRA h must be places of one buffer/,
        );
        await expect(planQkvMatmul(ctx, x, { q, k: { ...k, out: view(64, 64, 'k over q') }, v })).rejects.toThrow(
          /overlap/,
        );
        for (const l of [lq, lk, lv]) {
          l.h.dispose();
          l.b.dispose();
        }
      } finally {
        for (const z of [x, arena, wq, wk, wv, wodd, elsewhere]) z.dispose();
      }
    });
  });
});
