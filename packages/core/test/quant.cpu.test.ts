// The Q8_0 / Q4_0 quantizers against the `gguf` Python package (golden/quant.json, made by
// tools/golden_quant.py), which reproduces ggml's reference quantizers bit for bit.
import { describe, expect, it } from 'vitest';
import {
  dequantize,
  fromGgmlBlocks,
  gpuQuantLayout,
  packQuantized,
  type QuantFormat,
  quantize,
  quantizedBytes,
  roundThrough,
  toGgmlBlocks,
  unpackQuantized,
} from '../src/quant.js';
import golden from './golden/quant.json';

function bytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function floats(b64: string): Float32Array {
  const b = bytes(b64);
  return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
}

const FORMATS: QuantFormat[] = ['q8_0', 'q4_0'];

describe('Q8_0 and Q4_0 quantization', () => {
  for (const c of golden.cases) {
    for (const format of FORMATS) {
      it(`${format}: ${c.name} gives gguf's bytes and values`, () => {
        const x = floats(c.values);
        const want = (c as unknown as Record<QuantFormat, { blocks: string; dequantized: string }>)[format];
        const q = quantize(format, x, c.name);
        expect(toGgmlBlocks(q)).toEqual(bytes(want.blocks));
        expect(q.qs.byteLength + 2 * q.d.length).toBe(quantizedBytes(format, x.length));
        expect(dequantize(q)).toEqual(floats(want.dequantized));
        // ggml's file blocks read back to the same split form.
        expect(fromGgmlBlocks(format, bytes(want.blocks))).toEqual(q);
      });
    }
  }

  it('keeps every value within half a step (Q8_0) or a step (Q4_0) of its block', () => {
    const x = new Float32Array(32 * 40);
    for (let i = 0; i < x.length; i++) x[i] = Math.sin(i * 12.9898) * (1 + (i % 97));
    for (const format of FORMATS) {
      const q = quantize(format, x);
      const y = dequantize(q);
      for (let b = 0; b < q.d.length; b++) {
        let amax = 0;
        for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j] as number));
        // Q8_0's step is amax/127; Q4_0's is amax/8 (and +amax itself may clip to 7·d). The scale
        // is stored as f16, off by up to 2^-11 of itself, which moves 127 (or 8) steps that much.
        const step = format === 'q8_0' ? amax / 127 : amax / 8;
        const bound = format === 'q8_0' ? step * (0.5 + 127 * 2 ** -11) : step * (1 + 8 * 2 ** -11);
        for (let j = 0; j < 32; j++) {
          const err = Math.abs((y[b * 32 + j] as number) - (x[b * 32 + j] as number));
          expect(err).toBeLessThanOrEqual(bound * (1 + 1e-6));
        }
      }
    }
  });

  it('packs the GPU layout: quants, then the scales two per word', () => {
    const x = new Float32Array(32 * 3).map((_, i) => (i - 40) / 7);
    for (const format of FORMATS) {
      const q = quantize(format, x);
      const layout = gpuQuantLayout(format, x.length);
      const packed = packQuantized(q);
      expect(layout.qsBytes).toBe(q.qs.byteLength);
      expect(packed.byteLength % 4).toBe(0);
      expect(packed.subarray(0, layout.qsBytes)).toEqual(q.qs);
      const words = new Uint32Array(packed.buffer);
      expect(words[layout.scaleWordOffset]).toBe((((q.d[1] as number) << 16) | (q.d[0] as number)) >>> 0);
      expect(words[layout.scaleWordOffset + 1]).toBe(q.d[2]);
      expect(unpackQuantized(format, packed, x.length)).toEqual(q);
      expect(roundThrough(format, x)).toEqual(dequantize(q));
    }
  });

  it('refuses partial blocks, values that are not finite and scales beyond f16', () => {
    expect(() => quantize('q8_0', new Float32Array(33), 'w')).toThrow(/w: 33 values are not whole blocks of 32/);
    const bad = new Float32Array(64);
    bad[40] = Number.NaN;
    expect(() => quantize('q4_0', bad, 'model.layers.0.mlp.up_proj.weight')).toThrow(
      /model\.layers\.0\.mlp\.up_proj\.weight: value NaN at element 40 cannot be quantized/,
    );
    const big = new Float32Array(32);
    big[0] = 3e38;
    expect(() => quantize('q8_0', big, 'w')).toThrow(/beyond f16's range/);
    expect(() => fromGgmlBlocks('q8_0', new Uint8Array(35), 'blk.0.ffn_up.weight')).toThrow(
      /blk\.0\.ffn_up\.weight: 35 bytes are not whole q8_0 blocks of 34 bytes/,
    );
  });
});
