// Quantized tensors on the GPU: q8_0 / q4_0 uploads hold quant.ts's layout and read back as the
// dequantized values; shapes that are not whole blocks are refused before anything is allocated.
import { describe, expect, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import {
  createTensor,
  quantizedBytes,
  readFloat32,
  readTensor,
  roundThrough,
  ShapeError,
  tensorFromData,
} from '../src/index.js';
import { gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

describe('quantized tensors', () => {
  for (const dtype of ['q8_0', 'q4_0'] as const) {
    it(`${dtype}: upload quantizes, readback dequantizes`, async () => {
      const ctx = gpu();
      const values = randomArray(7 * 96, 11);
      await gpuCase(ctx, dtype, async () => {
        const t = tensorFromData(ctx, values, [7, 96], dtype, `w.${dtype}`);
        expect(t.byteLength).toBe(quantizedBytes(dtype, 7 * 96));
        expect(await readFloat32(t)).toEqual(roundThrough(dtype, values));
        expect(await readTensor(t)).toBeInstanceOf(Float32Array);
        t.dispose();
      });
    });
  }

  it('refuses rows that are not whole blocks, naming the tensor', () => {
    const ctx = gpu();
    const live = ctx.liveBufferCount;
    expect(() => createTensor(ctx, [4, 48], 'q4_0', 'model.layers.0.mlp.down_proj.weight')).toThrow(ShapeError);
    expect(() => createTensor(ctx, [4, 48], 'q8_0', 'down_proj')).toThrow(
      /down_proj: q8_0 needs the last dimension to be a multiple of 32, got \[4, 48\]/,
    );
    expect(ctx.liveBufferCount).toBe(live);
  });
});
