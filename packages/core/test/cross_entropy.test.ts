// Chunked cross-entropy (shaders/cross_entropy.wgsl + the LM-head matmul) against the float64
// reference: loss, count, lse, per-row loss and dH, for a covering design of rows, vocabulary
// sizes, chunk sizes that do and do not divide V (forced small so several chunks run), d, f16 and
// f32 E, ignored rows, an explicit divisor and g ≠ 1, through the fused training plan and through
// separate forward and backward plans. Then labels out of range, plan-time changes of divisor and
// g, NaN and infinite logits through the workgroup and chunk merges, the logits of selected rows,
// and shape errors.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { crossEntropyBackwardRef, crossEntropyForwardRef, logitsRef } from '../ref/cross_entropy.js';
import {
  createTensor,
  type DType,
  type GpuContext,
  type RowTable,
  readFloat32,
  readTensor,
  roundToF16,
  ShapeError,
  SplitRows,
  StepEncoder,
  type Tensor,
  tensorFromData,
  tensorView,
  writeTensor,
} from '../src/index.js';
import {
  CROSS_ENTROPY_LABEL_OUT_OF_RANGE,
  CROSS_ENTROPY_ROW_OUT_OF_RANGE,
  type CrossEntropyGradPlan,
  type CrossEntropyPlan,
  crossEntropyChunk,
  crossEntropyScratchBytes,
  planCrossEntropyBackward,
  planCrossEntropyForward,
  planCrossEntropyTraining,
  planLogitsRows,
} from '../src/kernels/cross_entropy.js';
import { lossScaleInitialState } from '../src/kernels/loss_scale.js';
import { expectClose, gpuCase, tableCases, useReductionPaths } from './gpu.js';

// Which of the table's cases each test project runs: gpu.ts's tableCases.
const tableIt = tableCases({ splitAcrossProfiles: () => true });

const paths = useReductionPaths();
const gpu = paths[0].gpu;

type LabelPattern = 'all' | 'mixed' | 'ignored' | 'bad';

interface Case {
  rows: number;
  vocab: number;
  d: number;
  dtype: DType;
  /** undefined: the default (one chunk for these vocabularies). */
  chunk?: number;
  labels: LabelPattern;
  divisor?: number;
  g?: number;
  /** Fused training plan, or separate forward and backward plans. */
  fused: boolean;
  /** The fused plan with a dlogits dispatch before each dH matmul instead of dz formed in it. */
  dzApart?: boolean;
  rowLoss: boolean;
  /** dH starts with values and the backward adds to them. */
  accumulate?: boolean;
  /** E split by rows into parts of these sizes (core's table.ts): chunks then stay within parts. */
  split?: number[];
}

// Each rows value meets each vocabulary size at least once across the design; chunk sizes that
// divide V (200 | 1000), that leave a short last chunk (63 = 3·16 + 15, 257 = 4·64 + 1, 1000 =
// 3·256 + 232, 63 = 15·4 + 3) and single chunks; both dtypes with both d.
const cases: Case[] = [
  { rows: 1, vocab: 1, d: 12, dtype: 'f32', labels: 'all', fused: true, rowLoss: true },
  { rows: 7, vocab: 63, d: 64, dtype: 'f16', chunk: 16, labels: 'mixed', fused: false, rowLoss: true },
  {
    rows: 65,
    vocab: 257,
    d: 12,
    dtype: 'f32',
    chunk: 64,
    labels: 'mixed',
    divisor: 100,
    g: 0.5,
    fused: true,
    rowLoss: false,
  },
  { rows: 7, vocab: 1000, d: 12, dtype: 'f16', chunk: 200, labels: 'all', g: 2, fused: true, rowLoss: true },
  {
    rows: 65,
    vocab: 1000,
    d: 64,
    dtype: 'f32',
    chunk: 256,
    labels: 'mixed',
    divisor: 37,
    fused: false,
    rowLoss: false,
  },
  { rows: 1, vocab: 257, d: 64, dtype: 'f16', labels: 'ignored', fused: true, rowLoss: true },
  {
    rows: 65,
    vocab: 63,
    d: 12,
    dtype: 'f16',
    chunk: 4,
    labels: 'mixed',
    g: -1.5,
    fused: true,
    rowLoss: true,
    accumulate: true,
  },
  { rows: 7, vocab: 257, d: 64, dtype: 'f32', chunk: 128, labels: 'bad', fused: false, rowLoss: true },
  // Labels outside the vocabulary inside the dH matmul's dz; and the training plan with dz apart.
  { rows: 7, vocab: 257, d: 64, dtype: 'f32', chunk: 128, labels: 'bad', fused: true, rowLoss: true },
  {
    rows: 65,
    vocab: 257,
    d: 12,
    dtype: 'f16',
    chunk: 64,
    labels: 'mixed',
    divisor: 100,
    g: 0.5,
    fused: true,
    dzApart: true,
    rowLoss: false,
  },
  { rows: 7, vocab: 63, d: 12, dtype: 'f32', chunk: 32, labels: 'ignored', divisor: 5, fused: false, rowLoss: false },
  // E in parts: 64-row chunks of parts of 100, 100 and 57 rows (short chunks inside the table).
  {
    rows: 65,
    vocab: 257,
    d: 12,
    dtype: 'f16',
    chunk: 64,
    labels: 'mixed',
    fused: true,
    rowLoss: true,
    split: [100, 100, 57],
  },
  {
    rows: 7,
    vocab: 1000,
    d: 64,
    dtype: 'f32',
    chunk: 256,
    labels: 'bad',
    fused: false,
    rowLoss: true,
    split: [400, 600],
  },
];

/** E on the GPU: one tensor, or parts of `split` rows. */
function uploadTable(
  ctx: GpuContext,
  e: Float64Array,
  vocab: number,
  d: number,
  dtype: DType,
  split?: number[],
): RowTable {
  if (!split) return tensorFromData(ctx, e, [vocab, d], dtype, 'e');
  const parts: Tensor[] = [];
  let start = 0;
  for (const n of split) {
    parts.push(tensorFromData(ctx, e.subarray(start * d, (start + n) * d), [n, d], dtype, `e[${start}:${start + n}]`));
    start += n;
  }
  return new SplitRows(parts, 'e');
}

/** Chunks of the loss: per part of E. */
function chunkCount(vocab: number, chunk: number, split?: number[]): number {
  return (split ?? [vocab]).reduce((n, rows) => n + Math.ceil(rows / chunk), 0);
}

function describeCase(c: Case): string {
  return (
    `rows=${c.rows} V=${c.vocab} d=${c.d} E:${c.dtype} chunk=${c.chunk ?? 'default'} labels:${c.labels}` +
    `${c.divisor ? ` divisor=${c.divisor}` : ''}${c.g !== undefined ? ` g=${c.g}` : ''}` +
    `${c.fused ? (c.dzApart ? ' fused, dz apart' : ' fused') : ' fwd+bwd'}${c.accumulate ? ' +=dH' : ''}${c.split ? ` E in parts [${c.split.join(', ')}]` : ''}`
  );
}

function makeLabels(pattern: LabelPattern, rows: number, vocab: number, seed: number): number[] {
  const r = randomArray(rows, seed);
  return Array.from(r, (x, i) => {
    const label = Math.min(vocab - 1, Math.floor(((x + 1) / 2) * vocab));
    if (pattern === 'ignored') return -100;
    if (pattern === 'mixed' && i % 3 === 1) return -100;
    if (pattern === 'bad') return [vocab, -1, -100, 2 ** 31 - 1, label, -(2 ** 31), vocab - 1][i % 7] as number;
    return label;
  });
}

/** What the GPU holds: H rounded to f32, E to f32 or f16. */
function asHeld(v: Float64Array, dtype: DType): Float64Array {
  return Float64Array.from(dtype === 'f16' ? roundToF16(v) : Float32Array.from(v));
}

interface Outputs {
  loss: Float32Array;
  lse: Float32Array;
  rowLoss?: Float32Array;
  dh: Float32Array;
  errors: number[];
}

async function readOutputs(t: {
  loss: Tensor;
  lse: Tensor;
  rowLoss?: Tensor;
  dh: Tensor;
  errors: Tensor;
}): Promise<Outputs> {
  return {
    loss: await readFloat32(t.loss),
    lse: await readFloat32(t.lse),
    rowLoss: t.rowLoss ? await readFloat32(t.rowLoss) : undefined,
    dh: await readFloat32(t.dh),
    errors: [...(await readTensor(t.errors))],
  };
}

function checkAgainstRef(
  ctx: GpuContext,
  name: string,
  got: Outputs,
  input: {
    rows: number;
    d: number;
    vocab: number;
    h: Float64Array;
    e: Float64Array;
    labels: number[];
    divisor?: number;
  },
  g: number,
  dh0?: Float64Array,
): void {
  const f = crossEntropyForwardRef(input);
  const b = crossEntropyBackwardRef(input, g);
  const want = dh0 ? b.dh.map((v, i) => v + (dh0[i] as number)) : b.dh;
  expectClose(ctx, `${name} loss`, [got.loss[0] as number], [f.loss], 2e-6, 2e-6);
  expect(got.loss[1], `${name} count`).toBe(f.count);
  expectClose(ctx, `${name} lse`, got.lse, f.lse, 2e-6, 2e-6);
  if (got.rowLoss) expectClose(ctx, `${name} rowLoss`, got.rowLoss, f.rowLoss, 4e-6, 2e-6);
  // dH is a sum over V of coef·(p − onehot)·E: errors scale with the largest coefficient.
  const scale = f.divisor > 0 ? Math.abs(g) / f.divisor : 0;
  expectClose(ctx, `${name} dh`, got.dh, want, 1e-6 + 2e-6 * scale, 1e-5);
  const bad = f.badLabels;
  expect(got.errors, `${name} errors`).toEqual(bad ? [CROSS_ENTROPY_LABEL_OUT_OF_RANGE, bad] : [0, 0]);
}

for (const path of paths) {
  describe(`cross-entropy (${path.name})`, () => {
    for (const c of cases) {
      tableIt(describeCase(c), async (t) => {
        const ctx = path.gpu(t);
        const seed = c.rows * 1009 + c.vocab * 7 + c.d;
        const h = asHeld(randomArray(c.rows * c.d, seed, 2), 'f32');
        const e = asHeld(randomArray(c.vocab * c.d, seed + 1), c.dtype);
        const labels = makeLabels(c.labels, c.rows, c.vocab, seed + 2);
        const dh0 = c.accumulate ? asHeld(randomArray(c.rows * c.d, seed + 3, 0.1), 'f32') : undefined;
        const g = c.g ?? 1;
        const name = describeCase(c);
        const got = await gpuCase(ctx, name, async () => {
          const t = {
            h: tensorFromData(ctx, h, [c.rows, c.d], 'f32', 'h'),
            e: uploadTable(ctx, e, c.vocab, c.d, c.dtype, c.split),
            labels: tensorFromData(ctx, labels, [c.rows], 'i32', 'labels'),
            lse: createTensor(ctx, [c.rows], 'f32', 'lse'),
            loss: createTensor(ctx, [4], 'f32', 'loss'),
            errors: createTensor(ctx, [2], 'u32', 'errors'),
            rowLoss: c.rowLoss ? createTensor(ctx, [c.rows], 'f32', 'row_loss') : undefined,
            dh: dh0
              ? tensorFromData(ctx, dh0, [c.rows, c.d], 'f32', 'dh')
              : createTensor(ctx, [c.rows, c.d], 'f32', 'dh'),
          };
          const opts = { chunk: c.chunk, divisor: c.divisor, g: c.g, accumulate: c.accumulate, dzInMatmul: !c.dzApart };
          const plans: (CrossEntropyPlan | CrossEntropyGradPlan)[] = c.fused
            ? [await planCrossEntropyTraining(ctx, t, opts)]
            : [await planCrossEntropyForward(ctx, t, opts), await planCrossEntropyBackward(ctx, t, opts)];
          const chunk = crossEntropyChunk(ctx, c.rows, c.vocab, opts);
          expect(plans[0]?.chunk).toBe(chunk);
          expect(plans[0]?.chunks).toBe(chunkCount(c.vocab, chunk, c.split));
          const bytes = crossEntropyScratchBytes(ctx, c.rows, c.vocab, opts);
          const scratch = plans.reduce((s, p) => s + p.scratchBytes, 0);
          expect(scratch).toBe(c.fused ? bytes.training : bytes.forward + bytes.backward);
          const enc = new StepEncoder(ctx, 'cross-entropy step');
          enc.clear(t.errors);
          for (const p of plans) p.record(enc);
          enc.submit();
          const out = await readOutputs(t);
          for (const p of plans) p.dispose();
          for (const v of Object.values(t)) v?.dispose();
          return out;
        });
        checkAgainstRef(
          ctx,
          name,
          got,
          { rows: c.rows, d: c.d, vocab: c.vocab, h, e, labels, divisor: c.divisor },
          g,
          dh0,
        );
      });
    }

    // The divergence check reads the loss: a NaN or +Inf logit anywhere must not come out finite
    // (before the bit test in the kernel, a NaN logit gave a finite lse of about 92 on SwiftShader).
    // One bad vocabulary entry puts one bad logit in every row, so it passes through one
    // invocation's running (max, sum), the workgroup merge (merge_workgroup, on this path's
    // reduction) and the merge across chunks (V = 300 in chunks of 64), in the first chunk or a later one.
    // Every project runs these (not a share, tableCases): what a driver does with NaN and Inf is
    // the driver's own.
    for (const [bad, badEntry] of [
      [Number.NaN, 201],
      [Number.NaN, 5],
      [Number.POSITIVE_INFINITY, 201],
      [Number.POSITIVE_INFINITY, 5],
      [Number.NEGATIVE_INFINITY, 201],
    ] as const) {
      const what =
        bad === Number.NEGATIVE_INFINITY ? 'leaves the loss as the reference has it' : 'makes lse and the loss NaN';
      it(`a ${bad} logit in every row (entry ${badEntry}, chunk ${Math.floor(badEntry / 64)}) ${what}`, async (t) => {
        const ctx = path.gpu(t);
        const rows = 5;
        const vocab = 300;
        const d = 8;
        // h > 0, so E[badEntry] = (bad, 0, ...) gives the logit bad·h[0] (NaN or +Inf) exactly.
        const h = Float32Array.from(randomArray(rows * d, 31, 1), (x) => Math.abs(x) + 0.1);
        const e = Float32Array.from(randomArray(vocab * d, 32), (x, i) =>
          Math.floor(i / d) === badEntry ? (i % d === 0 ? bad : 0) : x,
        );
        // Labels away from the bad entry: the NaN or Inf must come from the reduction itself.
        const labels = Array.from({ length: rows }, (_, i) => (i * 37) % 200);
        const got = await gpuCase(ctx, `${bad} logit`, async () => {
          const t = {
            h: tensorFromData(ctx, h, [rows, d], 'f32', 'h'),
            e: tensorFromData(ctx, e, [vocab, d], 'f32', 'e'),
            labels: tensorFromData(ctx, labels, [rows], 'i32', 'labels'),
            lse: createTensor(ctx, [rows], 'f32', 'lse'),
            loss: createTensor(ctx, [2], 'f32', 'loss'),
            errors: createTensor(ctx, [2], 'u32', 'errors'),
          };
          const plan = await planCrossEntropyForward(ctx, t, { chunk: 64 });
          expect(plan.chunks).toBe(5);
          const enc = new StepEncoder(ctx, 'non-finite logits');
          enc.clear(t.errors);
          plan.record(enc);
          enc.submit();
          const out = { loss: await readFloat32(t.loss), lse: await readFloat32(t.lse) };
          plan.dispose();
          for (const v of Object.values(t)) v.dispose();
          return out;
        });
        if (bad === Number.NEGATIVE_INFINITY) {
          // A −Inf logit is a masked entry: exp(−Inf) = 0, and the loss is the reference's.
          const ref = crossEntropyForwardRef({
            rows,
            d,
            vocab,
            h: Float64Array.from(h),
            e: Float64Array.from(e),
            labels,
          });
          expectClose(ctx, '-Inf logit lse', got.lse, ref.lse, 2e-6, 2e-6);
          expectClose(ctx, '-Inf logit loss', [got.loss[0] as number], [ref.loss], 2e-6, 2e-6);
        } else {
          // The NaN bit pattern, as the finish stores it, whatever the running sums made of it.
          for (const l of got.lse) expect(l, 'lse').toBeNaN();
          expect(got.loss[0], 'loss').toBeNaN();
          // The same inputs without the bad entry give a finite loss: only it did this.
          const without = crossEntropyForwardRef({
            rows,
            d,
            vocab,
            h: Float64Array.from(h),
            e: Float64Array.from(e, (x) => (Number.isFinite(x) ? x : 0)),
            labels,
          });
          expect(Number.isFinite(without.loss)).toBe(true);
        }
        expect(got.loss[1]).toBe(rows);
      });
    }

    for (const dzInMatmul of [true, false])
      it(`setDivisor and setGradScale change the next steps without planning again${dzInMatmul ? '' : ', dz apart'}`, async (t) => {
        const ctx = path.gpu(t);
        const rows = 7;
        const vocab = 63;
        const d = 12;
        const h = asHeld(randomArray(rows * d, 11, 2), 'f32');
        const e = asHeld(randomArray(vocab * d, 12), 'f32');
        const labels = makeLabels('mixed', rows, vocab, 13);
        const steps = await gpuCase(ctx, 'set uniforms', async () => {
          const t = {
            h: tensorFromData(ctx, h, [rows, d], 'f32', 'h'),
            e: tensorFromData(ctx, e, [vocab, d], 'f32', 'e'),
            labels: tensorFromData(ctx, labels, [rows], 'i32', 'labels'),
            lse: createTensor(ctx, [rows], 'f32', 'lse'),
            loss: createTensor(ctx, [4], 'f32', 'loss'),
            errors: createTensor(ctx, [2], 'u32', 'errors'),
            dh: createTensor(ctx, [rows, d], 'f32', 'dh'),
          };
          // A caller-owned logits scratch (bigger than needed) is used and not counted or released.
          const logits = createTensor(ctx, [rows * 40], 'f32', 'shared logits');
          const plan = await planCrossEntropyTraining(ctx, t, { chunk: 32, logits, dzInMatmul });
          expect(plan.scratchBytes).toBe(
            crossEntropyScratchBytes(ctx, rows, vocab, { chunk: 32 }).training - rows * 32 * 4,
          );
          const results: Outputs[] = [];
          for (const [divisor, g] of [
            [undefined, 1],
            [50, 3],
            [undefined, 0.25],
          ] as const) {
            plan.setDivisor(divisor);
            plan.setGradScale(g);
            const enc = new StepEncoder(ctx, 'step');
            enc.clear(t.errors);
            plan.record(enc);
            enc.submit();
            results.push(await readOutputs(t));
          }
          expect(() => plan.setDivisor(0)).toThrow(ShapeError);
          plan.dispose();
          expect(logits.disposed).toBe(false);
          logits.dispose();
          for (const v of Object.values(t)) v.dispose();
          return results;
        });
        const input = { rows, d, vocab, h, e, labels };
        checkAgainstRef(ctx, 'step 1', steps[0] as Outputs, input, 1);
        checkAgainstRef(ctx, 'step 2 divisor=50 g=3', steps[1] as Outputs, { ...input, divisor: 50 }, 3);
        checkAgainstRef(ctx, 'step 3 g=0.25', steps[2] as Outputs, input, 0.25);
      });

    // A loss scale S (the f16 backward's): dH and the coefficient in loss[2] are S times the unscaled
    // plan's, bit for bit (S a power of two), and the loss, count and lse are the same; S is read from
    // its buffer at run time, so a new S needs no new plan.
    for (const dzInMatmul of [true, false])
      it(`a loss scale multiplies dH exactly and leaves the loss${dzInMatmul ? '' : ', dz apart'}`, async (t) => {
        const ctx = path.gpu(t);
        const [rows, vocab, d] = [9, 70, 12];
        const h = asHeld(randomArray(rows * d, 21, 2), 'f32');
        const e = asHeld(randomArray(vocab * d, 22), 'f32');
        const labels = makeLabels('mixed', rows, vocab, 23);
        const [plain, ...scaled] = await gpuCase(ctx, 'loss scale', async () => {
          const make = (k: string) => ({
            h: tensorFromData(ctx, h, [rows, d], 'f32', `${k}.h`),
            e: tensorFromData(ctx, e, [vocab, d], 'f32', `${k}.e`),
            labels: tensorFromData(ctx, labels, [rows], 'i32', `${k}.labels`),
            lse: createTensor(ctx, [rows], 'f32', `${k}.lse`),
            loss: createTensor(ctx, [4], 'f32', `${k}.loss`),
            errors: createTensor(ctx, [2], 'u32', `${k}.errors`),
            dh: createTensor(ctx, [rows, d], 'f32', `${k}.dh`),
          });
          const a = make('plain');
          const b = make('scaled');
          const state = tensorFromData(ctx, lossScaleInitialState({ initScale: 2 ** 12 }), [4], 'f32', 'loss_scale');
          const pa = await planCrossEntropyTraining(ctx, a, { chunk: 32, dzInMatmul, divisor: 5 });
          const pb = await planCrossEntropyTraining(
            ctx,
            { ...b, lossScale: state },
            { chunk: 32, dzInMatmul, divisor: 5 },
          );
          const out: Outputs[] = [];
          for (const [plan, io] of [
            [pa, a],
            [pb, b],
          ] as const) {
            const enc = new StepEncoder(ctx, 'step');
            enc.clear(io.errors);
            plan.record(enc);
            enc.submit();
            out.push(await readOutputs(io));
          }
          writeTensor(state, lossScaleInitialState({ initScale: 2 ** 20, maxScale: 2 ** 20 }));
          const enc = new StepEncoder(ctx, 'step at 2^20');
          pb.record(enc);
          enc.submit();
          out.push(await readOutputs(b));
          for (const x of [pa, pb, state, ...Object.values(a), ...Object.values(b)]) x.dispose();
          return out;
        });
        const bits = (x: ArrayLike<number>) => [...new Uint32Array(Float32Array.from(x).buffer)];
        for (const [k, s] of [
          [0, 2 ** 12],
          [1, 2 ** 20],
        ] as const) {
          const got = scaled[k] as Outputs;
          expect(bits(got.dh), `dH at S = ${s}`).toEqual(bits(plain.dh.map((v) => v * s)));
          expect(bits(got.loss.slice(0, 2)), `loss and count at S = ${s}`).toEqual(bits(plain.loss.slice(0, 2)));
          expect(got.loss[2], `coefficient at S = ${s}`).toBe((plain.loss[2] as number) * s);
          expect(bits(got.lse)).toEqual(bits(plain.lse));
        }
      });
  });
}

describe('logits of selected rows', () => {
  for (const [rows, vocab, d, dtype, index, split] of [
    [65, 257, 64, 'f16', [64, 0, 65, 31, -1], undefined],
    [7, 63, 12, 'f32', undefined, undefined],
    [65, 257, 64, 'f16', [64, 0, 65, 31, -1], [128, 129]],
    [7, 63, 12, 'f32', undefined, [20, 20, 23]],
  ] as const) {
    const name = `rows=${rows} V=${vocab} d=${d} E:${dtype} ${index ? `index [${index.join(', ')}]` : 'all rows'}${split ? ` E in parts [${split.join(', ')}]` : ''}`;
    tableIt(name, async () => {
      const ctx = gpu();
      const h = asHeld(randomArray(rows * d, rows + vocab), 'f32');
      const e = asHeld(randomArray(vocab * d, rows + vocab + 1), dtype);
      const picked = index ?? Array.from({ length: rows }, (_, i) => i);
      const n = picked.length;
      const all = logitsRef(h, e, rows, d, vocab);
      const want = new Float64Array(n * vocab);
      picked.forEach((r, j) => {
        if (r >= 0 && r < rows) want.set(all.subarray(r * vocab, (r + 1) * vocab), j * vocab);
      });
      const bad = picked.filter((r) => r < 0 || r >= rows).length;
      const got = await gpuCase(ctx, name, async () => {
        const t = {
          h: tensorFromData(ctx, h, [rows, d], 'f32', 'h'),
          e: uploadTable(ctx, e, vocab, d, dtype, split ? [...split] : undefined),
          index: index ? tensorFromData(ctx, index, [n], 'i32', 'index') : undefined,
          logits: createTensor(ctx, [n, vocab], 'f32', 'logits'),
          errors: createTensor(ctx, [2], 'u32', 'errors'),
        };
        const plan = await planLogitsRows(ctx, t);
        // The gathered rows, and with a split E a block of logits per part and a zero index.
        const blocks = split ? split.reduce((s, r) => s + Math.ceil((n * r * 4) / 16) * 16, 16) : 0;
        expect(plan.scratchBytes).toBe((index ? n * d * 4 : 0) + blocks);
        const enc = new StepEncoder(ctx, 'logits rows');
        enc.clear(t.errors);
        plan.record(enc);
        enc.submit();
        const out = { logits: await readFloat32(t.logits), errors: [...(await readTensor(t.errors))] };
        plan.dispose();
        for (const v of Object.values(t)) v?.dispose();
        return out;
      });
      expectClose(ctx, `${name} logits`, got.logits, want, 2e-5 * Math.sqrt(d), 1e-5);
      expect(got.errors).toEqual(bad ? [CROSS_ENTROPY_ROW_OUT_OF_RANGE, bad] : [0, 0]);
    });
  }
});

describe('cross-entropy shapes', () => {
  it('names the operands when shapes do not fit', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'shape errors', async () => {
      const h = createTensor(ctx, [7, 12], 'f32', 'h');
      const e = createTensor(ctx, [63, 12], 'f16', 'e');
      const labels = createTensor(ctx, [7], 'i32', 'labels');
      const labelsF = createTensor(ctx, [7], 'f32', 'labels_f32');
      const lse = createTensor(ctx, [7], 'f32', 'lse');
      const loss = createTensor(ctx, [2], 'f32', 'loss');
      const errors = createTensor(ctx, [2], 'u32', 'errors');
      const dh = createTensor(ctx, [7, 12], 'f32', 'dh');
      const io = { h, e, labels, lse, loss, errors, dh };
      await expect(planCrossEntropyForward(ctx, { ...io, labels: labelsF })).rejects.toThrow(/labels labels_f32/);
      await expect(planCrossEntropyForward(ctx, { ...io, lse: loss })).rejects.toThrow(/lse loss/);
      await expect(planCrossEntropyForward(ctx, { ...io, e: createView(dh, [12, 7]) })).rejects.toThrow(/H h/);
      await expect(planCrossEntropyForward(ctx, io, { chunk: 10 })).rejects.toThrow(/multiple of 4/);
      await expect(planCrossEntropyForward(ctx, io, { divisor: -1 })).rejects.toThrow(/divisor/);
      await expect(planCrossEntropyBackward(ctx, { ...io, dh: h })).rejects.toThrow(/overlaps H/);
      await expect(planCrossEntropyTraining(ctx, { ...io, dh: lse })).rejects.toThrow(ShapeError);
      // Training leaves the backward's coefficient in loss[2].
      await expect(planCrossEntropyTraining(ctx, io)).rejects.toThrow(/loss loss .*3/);
      await expect(planLogitsRows(ctx, { h, e, logits: dh })).rejects.toThrow(/logits dh/);
      for (const t of [h, e, labels, labelsF, lse, loss, errors, dh]) t.dispose();
    });
  });

  it('chooses chunks within the scratch budget', () => {
    const ctx = gpu();
    expect(crossEntropyChunk(ctx, 7, 63)).toBe(63);
    // The default grows past 4096 rows of E while the scratch stays within 32 MiB.
    expect(crossEntropyChunk(ctx, 7, 5000)).toBe(5000);
    expect(crossEntropyChunk(ctx, 512, 49152)).toBe(16384);
    expect(crossEntropyChunk(ctx, 1024, 151936)).toBe(8192);
    expect(crossEntropyChunk(ctx, 7, 63, { chunk: 100 })).toBe(63);
    expect(crossEntropyChunk(ctx, 4096, 151936)).toBe(4096);
    expect(crossEntropyChunk(ctx, 16384, 151936)).toBe(1024);
    expect(crossEntropyChunk(ctx, 100, 151936, { maxScratchBytes: 100 * 4 * 1001 })).toBe(1000);
    expect(crossEntropyScratchBytes(ctx, 4096, 151936).training).toBe(4096 * 4096 * 4 + 4096 * 16);
  });
});

function createView(t: Tensor, shape: number[]): Tensor {
  return tensorView(t, 0, shape, 'f32', 'e_view');
}
