// silu_mul and gelu_new (shaders/activations.wgsl), forward and backward, against the float64
// references, on sizes that are and are not multiples of 4 (the kernels read vec4s), with
// saturated inputs (±30, ±100) that must give no NaN or overflow.
import { describe, expect, it } from 'vitest';
import { geluNewBackwardRef, geluNewForwardRef, siluMulBackwardRef, siluMulForwardRef } from '../ref/activations.js';
import { randomArray } from '../ref/check.js';
import { createTensor, readFloat32, ShapeError, StepEncoder, tensorFromData } from '../src/index.js';
import {
  planGeluNewBackward,
  planGeluNewForward,
  planSiluMulBackward,
  planSiluMulForward,
} from '../src/kernels/activations.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

const shapes: [number, number][] = [
  [1, 1],
  [7, 12],
  [65, 63],
  [1, 257],
  [257, 65],
];

const EXTREMES = [0, 30, -30, 100, -100, 3, -3, 1e-4];

function inputs(n: number, seed: number, scale: number): Float64Array {
  const v = randomArray(n, seed, scale);
  v.set(EXTREMES.slice(0, n));
  return v;
}

describe('activations', () => {
  for (const [rows, I] of shapes) {
    const n = rows * I;
    it(`silu_mul rows=${rows} I=${I}`, async () => {
      const ctx = gpu();
      const gate = inputs(n, n, 8);
      const up = randomArray(n, n + 1, 2);
      const dout = randomArray(n, n + 2);
      const ref = siluMulForwardRef(gate, up);
      const grads = siluMulBackwardRef(gate, up, dout);
      const got = await gpuCase(ctx, `silu_mul ${n}`, async () => {
        const t = {
          gate: tensorFromData(ctx, gate, [rows, I], 'f32', 'gate'),
          up: tensorFromData(ctx, up, [rows, I], 'f32', 'up'),
          out: createTensor(ctx, [rows, I], 'f32', 'out'),
          dout: tensorFromData(ctx, dout, [rows, I], 'f32', 'dout'),
          dgate: createTensor(ctx, [rows, I], 'f32', 'dgate'),
          dup: createTensor(ctx, [rows, I], 'f32', 'dup'),
        };
        const fwd = await planSiluMulForward(ctx, t);
        const bwd = await planSiluMulBackward(ctx, t);
        const enc = new StepEncoder(ctx, 'silu_mul step');
        enc.dispatch(fwd, bwd);
        enc.submit();
        const out = { out: await readFloat32(t.out), dgate: await readFloat32(t.dgate), dup: await readFloat32(t.dup) };
        fwd.dispose();
        bwd.dispose();
        for (const v of Object.values(t)) v.dispose();
        return out;
      });
      expectClose(ctx, `silu_mul ${rows}x${I} out`, got.out, ref.out, 1e-6, 1e-5);
      expectClose(ctx, `silu_mul ${rows}x${I} dgate`, got.dgate, grads.dgate, 1e-6, 1e-5);
      expectClose(ctx, `silu_mul ${rows}x${I} dup`, got.dup, grads.dup, 1e-6, 1e-5);
    });

    it(`gelu_new rows=${rows} I=${I}`, async () => {
      const ctx = gpu();
      const x = inputs(n, n + 3, 6);
      const dy = randomArray(n, n + 4);
      const ref = geluNewForwardRef(x);
      const grads = geluNewBackwardRef(x, dy);
      const got = await gpuCase(ctx, `gelu_new ${n}`, async () => {
        const t = {
          x: tensorFromData(ctx, x, [rows, I], 'f32', 'x'),
          y: createTensor(ctx, [rows, I], 'f32', 'y'),
          dy: tensorFromData(ctx, dy, [rows, I], 'f32', 'dy'),
          dx: createTensor(ctx, [rows, I], 'f32', 'dx'),
        };
        const fwd = await planGeluNewForward(ctx, t);
        const bwd = await planGeluNewBackward(ctx, t);
        const enc = new StepEncoder(ctx, 'gelu_new step');
        enc.dispatch(fwd, bwd);
        enc.submit();
        const out = { y: await readFloat32(t.y), dx: await readFloat32(t.dx) };
        fwd.dispose();
        bwd.dispose();
        for (const v of Object.values(t)) v.dispose();
        return out;
      });
      expectClose(ctx, `gelu_new ${rows}x${I} y`, got.y, ref.y, 1e-6, 1e-5);
      expectClose(ctx, `gelu_new ${rows}x${I} dx`, got.dx, grads.dx, 1e-6, 1e-5);
    });
  }

  it('rejects operands of different sizes, naming them', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'activation shapes', async () => {
      const gate = createTensor(ctx, [7, 12], 'f32', 'gate');
      const up = createTensor(ctx, [7, 11], 'f32', 'up');
      await expect(planSiluMulForward(ctx, { gate, up, out: gate })).rejects.toThrow(ShapeError);
      await expect(planGeluNewForward(ctx, { x: gate, y: up })).rejects.toThrow(/y up f32\[7, 11\]/);
      gate.dispose();
      up.dispose();
    });
  });
});
