// LoRA dropout (shaders/dropout.wgsl): the mask against the CPU reference's hash bit for bit, the
// kept fraction and the 1/(1 − p) scaling statistically, the same counters giving the same mask
// and any other counter another one; and the LoRA layer with dropout, forward and backward,
// against the float64 reference that applies the same mask.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { dropoutMaskRef } from '../ref/dropout.js';
import { type LoraRefInput, loraBackwardRef, loraForwardRef } from '../ref/lora.js';
import {
  createTensor,
  dropoutCounter,
  type GpuContext,
  planDropout,
  planLoraBackward,
  planLoraForward,
  readFloat32,
  StepEncoder,
  type Tensor,
  tensorFromData,
} from '../src/index.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

async function runDropout(
  ctx: GpuContext,
  x: Float32Array,
  p: number,
  counter: { seed: number; step: number; micro: number; module: number },
): Promise<Float32Array> {
  return gpuCase(ctx, 'dropout', async () => {
    const tx = tensorFromData(ctx, x, [x.length], 'f32', 'x');
    const ty = createTensor(ctx, [x.length], 'f32', 'y');
    const tc = tensorFromData(ctx, dropoutCounter(counter.seed, counter.step, counter.micro), [4], 'u32', 'counter');
    const d = await planDropout(ctx, { p, module: counter.module, counter: tc }, tx, ty);
    new StepEncoder(ctx, 'dropout').dispatch(d).submit();
    const y = await readFloat32(ty);
    d.dispose();
    for (const t of [tx, ty, tc]) t.dispose();
    return y;
  });
}

describe('dropout mask', () => {
  it('keeps exactly the elements the reference hash keeps, scaled by 1/(1 − p)', async () => {
    const ctx = gpu();
    for (const [n, p, c] of [
      [1, 0.5, { seed: 0, step: 1, micro: 0, module: 0 }],
      [257, 0.1, { seed: 7, step: 3, micro: 1, module: 12 }],
      [65537, 0.3, { seed: 4294967295, step: 100000, micro: 3, module: 195 }],
    ] as const) {
      const x = Float32Array.from({ length: n }, (_, i) => 1 + (i % 17) / 8);
      const y = await runDropout(ctx, x, p, c);
      const keep = dropoutMaskRef(c, p, n);
      const scale = Math.fround(1 / (1 - p));
      const want = Float32Array.from(x, (v, i) => (keep[i] ? Math.fround(scale * v) : 0));
      expect(y, `n=${n} p=${p}`).toEqual(want);
    }
  });

  it('keeps 1 − p of the elements and preserves the mean (statistically)', async () => {
    const ctx = gpu();
    const n = 200_000;
    const ones = new Float32Array(n).fill(1);
    for (const p of [0.05, 0.1, 0.3, 0.5]) {
      const y = await runDropout(ctx, ones, p, { seed: 11, step: 2, micro: 0, module: 5 });
      const kept = y.reduce((k, v) => k + (v !== 0 ? 1 : 0), 0);
      const sigma = Math.sqrt((p * (1 - p)) / n);
      expect(Math.abs(kept / n - (1 - p)), `p=${p}: kept ${kept} of ${n}`).toBeLessThan(4 * sigma);
      const mean = y.reduce((s, v) => s + v, 0) / n;
      expect(Math.abs(mean - 1), `p=${p}: mean ${mean}`).toBeLessThan((4 * sigma) / (1 - p));
    }
  });

  it('the same counters give the same mask; another step, micro-batch, module or seed another', async () => {
    const ctx = gpu();
    const n = 20_000;
    const p = 0.3;
    const ones = new Float32Array(n).fill(1);
    const base = { seed: 3, step: 10, micro: 0, module: 4 };
    const a = await runDropout(ctx, ones, p, base);
    expect(await runDropout(ctx, ones, p, base)).toEqual(a);
    for (const other of [
      { ...base, step: 11 },
      { ...base, micro: 1 },
      { ...base, module: 5 },
      { ...base, seed: 4 },
    ]) {
      const b = await runDropout(ctx, ones, p, other);
      // Independent masks agree on p² + (1 − p)² of the elements.
      const agree = a.reduce((k, v, i) => k + ((v !== 0) === (b[i] !== 0) ? 1 : 0), 0) / n;
      expect(Math.abs(agree - (p * p + (1 - p) * (1 - p))), JSON.stringify(other)).toBeLessThan(0.02);
    }
  });
});

describe('LoRA layer with dropout', () => {
  for (const c of [
    { T: 7, inF: 65, outF: 63, r: 8, p: 0.25, w0: 'f32' as const, accumulate: false },
    { T: 33, inF: 64, outF: 96, r: 4, p: 0.5, w0: 'q8_0' as const, accumulate: true },
  ]) {
    const name = `T=${c.T} in=${c.inF} out=${c.outF} r=${c.r} p=${c.p} W0:${c.w0}${c.accumulate ? ' accumulate' : ''}`;
    it(name, async () => {
      const ctx = gpu();
      const counter = { seed: 9, step: 4, micro: 1, module: 17 };
      const keep = dropoutMaskRef(counter, c.p, c.T * c.inF);
      const w0 = randomArray(c.outF * c.inF, 2, 0.5);
      const input: LoraRefInput = {
        T: c.T,
        inF: c.inF,
        outF: c.outF,
        r: c.r,
        x: randomArray(c.T * c.inF, 1),
        w0,
        a: randomArray(c.r * c.inF, 3, 0.5),
        b: randomArray(c.outF * c.r, 4, 0.5),
        scale: 2,
        dropout: { keep, p: c.p },
      };
      const dy = randomArray(c.T * c.outF, 5);
      const prevDx = randomArray(c.T * c.inF, 6);
      const got = await gpuCase(ctx, name, async () => {
        const w = tensorFromData(ctx, w0, [c.outF, c.inF], c.w0, 'w0');
        const held = c.w0 === 'f32' ? w0 : Float64Array.from(await readFloat32(w));
        input.w0 = held;
        const owned: Tensor[] = [w];
        const t = (data: ArrayLike<number>, shape: number[], label: string) => {
          const x = tensorFromData(ctx, data, shape, 'f32', label);
          owned.push(x);
          return x;
        };
        const e = (shape: number[], label: string) => {
          const x = createTensor(ctx, shape, 'f32', label);
          owned.push(x);
          return x;
        };
        const layer = {
          w0: w,
          a: t(input.a, [c.r, c.inF], 'A'),
          b: t(input.b, [c.outF, c.r], 'B'),
          scale: input.scale,
        };
        const x = t(input.x, [c.T, c.inF], 'x');
        const cnt = tensorFromData(
          ctx,
          dropoutCounter(counter.seed, counter.step, counter.micro),
          [4],
          'u32',
          'counter',
        );
        owned.push(cnt);
        const dropout = { mask: { p: c.p, module: counter.module, counter: cnt }, scratch: e([c.T, c.inF], 'scratch') };
        const io = {
          x,
          h: e([c.T, c.r], 'h'),
          dy: t(dy, [c.T, c.outF], 'dy'),
          g: e([c.T, c.r], 'g'),
          dx: c.accumulate ? t(prevDx, [c.T, c.inF], 'dx') : e([c.T, c.inF], 'dx'),
          da: e([c.r, c.inF], 'dA'),
          db: e([c.outF, c.r], 'dB'),
          dropout,
        };
        const y = e([c.T, c.outF], 'y');
        const fwd = await planLoraForward(ctx, layer, { x, y, h: io.h, dropout });
        const bwd = await planLoraBackward(ctx, layer, io, { accumulateDx: c.accumulate });
        new StepEncoder(ctx, name).dispatch(...fwd, ...bwd).submit();
        const out = {
          y: await readFloat32(y),
          h: await readFloat32(io.h),
          dx: await readFloat32(io.dx),
          da: await readFloat32(io.da),
          db: await readFloat32(io.db),
        };
        for (const d of [...fwd, ...bwd]) d.dispose();
        for (const o of owned) o.dispose();
        return out;
      });
      const f = loraForwardRef(input);
      const g = loraBackwardRef(input, dy);
      const dx = c.accumulate ? g.dx.map((v, i) => v + (prevDx[i] as number)) : g.dx;
      const tol = (k: number) => 4e-5 * Math.sqrt(k);
      expectClose(ctx, `${name} h`, got.h, f.h, tol(c.inF), 1e-5);
      expectClose(ctx, `${name} y`, got.y, f.y, tol(c.inF), 1e-5);
      expectClose(ctx, `${name} dx`, got.dx, dx, tol(c.outF + c.r), 1e-5);
      expectClose(ctx, `${name} dA`, got.da, g.da, tol(c.T * c.outF), 1e-5);
      expectClose(ctx, `${name} dB`, got.db, g.db, tol(c.T * c.inF), 1e-5);
    });
  }
});
