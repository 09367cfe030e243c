/**
 * IEEE half-precision conversion on the CPU, round-to-nearest-even, used to upload f16 weights
 * (two halves per u32, element 2i in the low 16 bits, which is what WGSL's unpack2x16float reads
 * as .x) and to decode them for references.
 */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32ToF16Bits(value: number): number {
  f32[0] = value;
  return f32BitsToF16Bits(u32[0] as number);
}

/** The same on the bits of an f32 (no float store per element: the bulk conversions use it). */
export function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf / nan
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) {
    // subnormal half (or zero)
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e;
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++; // may carry into the exponent: correct
  return sign | half;
}

export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Packs values as f16, two per u32 (length rounded up to an even count). */
export function packF16(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length + (values.length & 1));
  for (let i = 0; i < values.length; i++) out[i] = f32ToF16Bits(values[i] as number);
  return out;
}

export function unpackF16(bits: Uint16Array, count = bits.length): Float32Array {
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = f16BitsToF32(bits[i] as number);
  return out;
}

/** Rounds each value to the nearest f16, as the GPU will see it. */
export function roundToF16(values: ArrayLike<number>): Float32Array {
  return unpackF16(packF16(values), values.length);
}

/** bfloat16 is the top half of an f32. */
export function bf16BitsToF32(b: number): number {
  u32[0] = b << 16;
  return f32[0] as number;
}
