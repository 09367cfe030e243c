/**
 * ggml tensor data -> f32 values on the CPU, for the GGUF types webtune reads: F32, F16, BF16,
 * Q8_0, Q4_0 (also kept as they are on the GPU, see gguf-model.ts), and the k-quants Q4_K and
 * Q6_K of llama.cpp's Q4_K_M / Q4_K_S files, dequantized on load and stored at a precision the
 * GPU kernels read (q8_0 by default: finer than Q4_K's grid, so nothing of it is lost twice).
 *
 * k-quant super-blocks hold 256 values (ggml's block_q4_K and block_q6_K, little-endian):
 *   Q4_K (144 bytes): d (f16), dmin (f16), 12 bytes of 6-bit scale and min for each of 8
 *        sub-blocks of 32, then 128 bytes of 4-bit quants. Sub-block pair (2j, 2j+1) uses bytes
 *        32j..32j+31: low nibbles for 2j, high nibbles for 2j+1. value = d·sc·q − dmin·m.
 *        Scales: for sub-block k < 4, sc = s[k] & 63 and m = s[k+4] & 63; for k ≥ 4,
 *        sc = (s[k+4] & 15) | (s[k-4] >> 6) << 4 and m = (s[k+4] >> 4) | (s[k] >> 6) << 4.
 *   Q6_K (210 bytes): ql (128 bytes: low 4 bits), qh (64 bytes: high 2 bits), 16 int8 scales,
 *        d (f16). Two halves of 128 values; in half h, for l < 32, the four values l, l+32, l+64,
 *        l+96 take low nibbles of ql[l], ql[l+32], high nibbles of ql[l], ql[l+32], and bits
 *        0-1, 2-3, 4-5, 6-7 of qh[l]; q − 32 is scaled by d·scale[l/16 + 0, 2, 4, 6].
 * The arithmetic is f32 step by step as in ggml's dequantize_row_q4_K / _q6_K (checked against
 * the gguf Python package's dequantization, bit for bit).
 */
import { dequantize, f16BitsToF32, fromGgmlBlocks } from '@webtune/core';
import { decodeToF32Bits } from './safetensors.js';

/** The GGUF tensor types loadModel reads. */
export const GGUF_SUPPORTED_TYPES = ['F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_K', 'Q6_K'] as const;
export type GgufSupportedType = (typeof GGUF_SUPPORTED_TYPES)[number];

export function isGgufSupportedType(t: string): t is GgufSupportedType {
  return (GGUF_SUPPORTED_TYPES as readonly string[]).includes(t);
}

const f32 = Math.fround;

function half(bytes: Uint8Array, at: number): number {
  return f16BitsToF32((bytes[at] as number) | ((bytes[at + 1] as number) << 8));
}

function dequantizeQ4K(bytes: Uint8Array, out: Float32Array): void {
  for (let b = 0; b * 144 < bytes.byteLength; b++) {
    const o = b * 144;
    const d = half(bytes, o);
    const dmin = half(bytes, o + 2);
    const s = bytes.subarray(o + 4, o + 16);
    const q = bytes.subarray(o + 16, o + 144);
    const scaleMin = (k: number): [number, number] => {
      if (k < 4) return [(s[k] as number) & 63, (s[k + 4] as number) & 63];
      return [
        ((s[k + 4] as number) & 15) | (((s[k - 4] as number) >> 6) << 4),
        ((s[k + 4] as number) >> 4) | (((s[k] as number) >> 6) << 4),
      ];
    };
    const y = b * 256;
    for (let j = 0; j < 4; j++) {
      const [sc1, m1] = scaleMin(2 * j);
      const [sc2, m2] = scaleMin(2 * j + 1);
      const d1 = f32(d * sc1);
      const min1 = f32(dmin * m1);
      const d2 = f32(d * sc2);
      const min2 = f32(dmin * m2);
      for (let l = 0; l < 32; l++) {
        const byte = q[32 * j + l] as number;
        out[y + 64 * j + l] = f32(f32(d1 * (byte & 15)) - min1);
        out[y + 64 * j + 32 + l] = f32(f32(d2 * (byte >> 4)) - min2);
      }
    }
  }
}

function dequantizeQ6K(bytes: Uint8Array, out: Float32Array): void {
  for (let b = 0; b * 210 < bytes.byteLength; b++) {
    const o = b * 210;
    const d = half(bytes, o + 208);
    for (let h = 0; h < 2; h++) {
      const ql = o + 64 * h;
      const qh = o + 128 + 32 * h;
      const sc = o + 192 + 8 * h;
      const y = b * 256 + 128 * h;
      for (let l = 0; l < 32; l++) {
        const is = l >> 4;
        const lo0 = bytes[ql + l] as number;
        const lo1 = bytes[ql + l + 32] as number;
        const hi = bytes[qh + l] as number;
        const q1 = ((lo0 & 15) | ((hi & 3) << 4)) - 32;
        const q2 = ((lo1 & 15) | (((hi >> 2) & 3) << 4)) - 32;
        const q3 = ((lo0 >> 4) | (((hi >> 4) & 3) << 4)) - 32;
        const q4 = ((lo1 >> 4) | (((hi >> 6) & 3) << 4)) - 32;
        const scale = (k: number) => f32(d * (((bytes[sc + is + k] as number) << 24) >> 24));
        out[y + l] = f32(scale(0) * q1);
        out[y + l + 32] = f32(scale(2) * q2);
        out[y + l + 64] = f32(scale(4) * q3);
        out[y + l + 96] = f32(scale(6) * q4);
      }
    }
  }
}

/** Decodes whole blocks (rows) of a ggml tensor's data to f32 values (`out` holds them all). */
export function decodeGgml(type: GgufSupportedType, bytes: Uint8Array, out: Float32Array): void {
  switch (type) {
    case 'F32':
    case 'F16':
    case 'BF16':
      decodeToF32Bits(type, bytes, new Uint32Array(out.buffer, out.byteOffset, out.length));
      return;
    case 'Q8_0':
      out.set(dequantize(fromGgmlBlocks('q8_0', bytes)));
      return;
    case 'Q4_0':
      out.set(dequantize(fromGgmlBlocks('q4_0', bytes)));
      return;
    case 'Q4_K':
      dequantizeQ4K(bytes, out);
      return;
    case 'Q6_K':
      dequantizeQ6K(bytes, out);
      return;
  }
}
