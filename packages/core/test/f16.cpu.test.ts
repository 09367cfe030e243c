import { describe, expect, it } from 'vitest';
import { bf16BitsToF32, f16BitsToF32, f32ToF16Bits, packF16, roundToF16, unpackF16 } from '../src/f16.js';

describe('f16 conversion', () => {
  it('encodes exact values, limits, subnormals and specials', () => {
    const cases: [number, number][] = [
      [0, 0x0000],
      [-0, 0x8000],
      [1, 0x3c00],
      [-2, 0xc000],
      [0.5, 0x3800],
      [65504, 0x7bff], // largest finite
      [65520, 0x7c00], // rounds to inf
      [2 ** -14, 0x0400], // smallest normal
      [2 ** -24, 0x0001], // smallest subnormal
      [2 ** -25, 0x0000], // ties to even: 0
      [3 * 2 ** -25, 0x0002], // 1.5 ulp -> 2 (even)
      [Number.POSITIVE_INFINITY, 0x7c00],
      [Number.NEGATIVE_INFINITY, 0xfc00],
    ];
    for (const [v, bits] of cases) expect(f32ToF16Bits(v), String(v)).toBe(bits);
    expect(Number.isNaN(f16BitsToF32(f32ToF16Bits(Number.NaN)))).toBe(true);
  });

  it('rounds to nearest, ties to even', () => {
    // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: ties to even gives 1.
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00);
    // 1 + 3·2^-11 lies halfway between 1+2^-10 (odd) and 1+2^-9 (even).
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(f32ToF16Bits(1 + 2 ** -11 + 2 ** -20)).toBe(0x3c01);
  });

  it('round-trips every half exactly', () => {
    for (let h = 0; h < 0x10000; h++) {
      const exp = (h >>> 10) & 0x1f;
      if (exp === 0x1f && (h & 0x3ff) !== 0) continue; // NaN payloads
      expect(f32ToF16Bits(f16BitsToF32(h))).toBe(h);
    }
  });

  it('packs two per u32, element 0 in the low half', () => {
    const packed = packF16([1, -2, 0.5]);
    expect(packed.length).toBe(4);
    const words = new Uint32Array(packed.buffer);
    expect(words[0]).toBe(((0xc000 << 16) | 0x3c00) >>> 0);
    expect([...unpackF16(packed, 3)]).toEqual([1, -2, 0.5]);
    expect([...roundToF16([0.1])][0]).toBeCloseTo(0.0999755859375, 12);
  });

  it('reads bfloat16 as the top half of an f32', () => {
    expect(bf16BitsToF32(0x3f80)).toBe(1);
    expect(bf16BitsToF32(0xc040)).toBe(-3);
  });
});
