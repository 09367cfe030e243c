/**
 * llama.cpp's (ggml's) block quantization of frozen weights, on the CPU: Q8_0 and Q4_0. Each row
 * of a weight is cut into blocks of 32 consecutive values along its input dimension; a block keeps
 * one f16 scale d and 32 small integers q, and stands for the values q·d.
 *
 *   Q8_0  d = absmax / 127, q = round(x / d) in [-127, 127]           (34 bytes per block)
 *   Q4_0  d = m / -8 where m is the block's value of largest magnitude (the first one on a tie),
 *         q = min(15, floor(x / d + 8.5)) in [0, 15], value (q - 8)·d  (18 bytes per block)
 *
 * The arithmetic is that of ggml's reference quantizers (quantize_row_q8_0_ref and
 * quantize_row_q4_0_ref), step by step in f32, so a tensor we quantize and the same tensor
 * quantized by llama.cpp (or by the `gguf` Python package, which reproduces them) hold the same
 * bytes: "x / d" is x·(1/d) with 1/d rounded to f32 first, the scale used to quantize is the f32 d
 * (the block stores it rounded to f16, nearest-even), round() is C's roundf (halves away from
 * zero) and floor is the C cast's truncation (its argument is never negative).
 *
 * In ggml's files a block is [d (2 bytes)][qs]. Q8_0's qs are the 32 values as int8. Q4_0's are 16
 * bytes: byte j holds value j in its low nibble and value j + 16 in its high nibble. On the GPU
 * (see gpuQuantLayout) the qs bytes are kept exactly as ggml orders them, every block's after the
 * other, and the scales follow them all, so that every load is 4-byte aligned.
 */
import { ShapeError } from './errors.js';
import { f16BitsToF32, f32ToF16Bits } from './f16.js';

export type QuantFormat = 'q8_0' | 'q4_0';

/** Values per block (ggml's QK8_0 and QK4_0). */
export const QUANT_BLOCK = 32;

/** Bytes of qs per block. */
const QS_BYTES: Record<QuantFormat, number> = { q8_0: 32, q4_0: 16 };

/** A quantized run of values: the blocks' quants and their f16 scales, split. */
export interface QuantizedBlocks {
  readonly format: QuantFormat;
  /** qs of every block in order: 32 (Q8_0, int8 as bytes) or 16 (Q4_0) bytes per block. */
  readonly qs: Uint8Array<ArrayBuffer>;
  /** f16 bits of each block's scale. */
  readonly d: Uint16Array<ArrayBuffer>;
}

export function isQuantFormat(v: unknown): v is QuantFormat {
  return v === 'q8_0' || v === 'q4_0';
}

/** Bytes per block in ggml's files (scale + quants). */
export function ggmlBlockBytes(format: QuantFormat): number {
  return 2 + QS_BYTES[format];
}

/** Bytes that `count` values take quantized (no padding: count must be a multiple of 32). */
export function quantizedBytes(format: QuantFormat, count: number): number {
  return (count / QUANT_BLOCK) * ggmlBlockBytes(format);
}

function checkCount(what: string, count: number): number {
  if (!Number.isSafeInteger(count) || count < 0 || count % QUANT_BLOCK !== 0) {
    throw new ShapeError(`${what}: ${count} values are not whole blocks of ${QUANT_BLOCK}`);
  }
  return count / QUANT_BLOCK;
}

/** C's roundf: to nearest, halves away from zero. */
function roundHalfAway(v: number): number {
  return v < 0 ? -Math.floor(-v + 0.5) : Math.floor(v + 0.5);
}

function checkFinite(label: string, x: ArrayLike<number>, start: number, end: number): void {
  for (let i = start; i < end; i++) {
    const v = x[i] as number;
    if (!Number.isFinite(v)) throw new ShapeError(`${label}: value ${v} at element ${i} cannot be quantized`);
  }
}

function scaleBits(label: string, d: number, block: number, format: QuantFormat): number {
  const bits = f32ToF16Bits(d);
  if ((bits & 0x7c00) === 0x7c00) {
    throw new ShapeError(
      `${label}: block ${block} needs the scale ${d}, beyond f16's range: ${format} cannot hold values this large (keep this tensor f16 or f32)`,
    );
  }
  return bits;
}

/**
 * Quantizes values (taken as f32) to Q8_0 or Q4_0; `label` names the tensor in errors (a value
 * that is not finite, a block whose scale overflows f16).
 */
export function quantize(format: QuantFormat, x: ArrayLike<number>, label = 'quantize'): QuantizedBlocks {
  const blocks = checkCount(label, x.length);
  const qs = new Uint8Array(blocks * QS_BYTES[format]);
  const d = new Uint16Array(blocks);
  const v = new Float32Array(QUANT_BLOCK);
  for (let b = 0; b < blocks; b++) {
    const base = b * QUANT_BLOCK;
    checkFinite(label, x, base, base + QUANT_BLOCK);
    for (let j = 0; j < QUANT_BLOCK; j++) v[j] = x[base + j] as number;
    if (format === 'q8_0') {
      let amax = 0;
      for (let j = 0; j < QUANT_BLOCK; j++) amax = Math.max(amax, Math.abs(v[j] as number));
      const scale = Math.fround(amax / 127);
      const inv = scale !== 0 ? Math.fround(1 / scale) : 0;
      d[b] = scaleBits(label, scale, b, format);
      for (let j = 0; j < QUANT_BLOCK; j++) {
        qs[b * 32 + j] = roundHalfAway(Math.fround((v[j] as number) * inv)) & 0xff;
      }
    } else {
      let amax = 0;
      let max = 0;
      for (let j = 0; j < QUANT_BLOCK; j++) {
        const a = Math.abs(v[j] as number);
        if (amax < a) {
          amax = a;
          max = v[j] as number;
        }
      }
      const scale = Math.fround(max / -8);
      const inv = scale !== 0 ? Math.fround(1 / scale) : 0;
      d[b] = scaleBits(label, scale, b, format);
      const q = (value: number) => Math.min(15, Math.trunc(Math.fround(Math.fround(value * inv) + 8.5)));
      for (let j = 0; j < 16; j++) qs[b * 16 + j] = q(v[j] as number) | (q(v[j + 16] as number) << 4);
    }
  }
  return { format, qs, d };
}

/** The values the blocks stand for, q·d (Q8_0) or (q - 8)·d (Q4_0), in f32 (exact). */
export function dequantize(q: QuantizedBlocks): Float32Array {
  const blocks = q.d.length;
  const out = new Float32Array(blocks * QUANT_BLOCK);
  for (let b = 0; b < blocks; b++) {
    const scale = f16BitsToF32(q.d[b] as number);
    const base = b * QUANT_BLOCK;
    if (q.format === 'q8_0') {
      for (let j = 0; j < 32; j++) out[base + j] = (((q.qs[b * 32 + j] as number) << 24) >> 24) * scale;
    } else {
      for (let j = 0; j < 16; j++) {
        const byte = q.qs[b * 16 + j] as number;
        out[base + j] = ((byte & 0x0f) - 8) * scale;
        out[base + j + 16] = ((byte >> 4) - 8) * scale;
      }
    }
  }
  return out;
}

/** Rounds values through the format, as the GPU will see them: dequantize(quantize(x)). */
export function roundThrough(format: QuantFormat, x: ArrayLike<number>, label?: string): Float32Array {
  return dequantize(quantize(format, x, label));
}

/** Splits ggml's blocks as stored in a GGUF file ([d][qs] per block) into scales and quants. */
export function fromGgmlBlocks(format: QuantFormat, bytes: Uint8Array, label = 'ggml blocks'): QuantizedBlocks {
  const per = ggmlBlockBytes(format);
  if (bytes.byteLength % per !== 0) {
    throw new ShapeError(`${label}: ${bytes.byteLength} bytes are not whole ${format} blocks of ${per} bytes`);
  }
  const blocks = bytes.byteLength / per;
  const qsBytes = QS_BYTES[format];
  const qs = new Uint8Array(blocks * qsBytes);
  const d = new Uint16Array(blocks);
  for (let b = 0; b < blocks; b++) {
    const at = b * per;
    d[b] = (bytes[at] as number) | ((bytes[at + 1] as number) << 8);
    qs.set(bytes.subarray(at + 2, at + per), b * qsBytes);
  }
  return { format, qs, d };
}

/** The inverse of fromGgmlBlocks: ggml's file layout. */
export function toGgmlBlocks(q: QuantizedBlocks): Uint8Array<ArrayBuffer> {
  const per = ggmlBlockBytes(q.format);
  const qsBytes = QS_BYTES[q.format];
  const out = new Uint8Array(q.d.length * per);
  for (let b = 0; b < q.d.length; b++) {
    const at = b * per;
    out[at] = (q.d[b] as number) & 0xff;
    out[at + 1] = (q.d[b] as number) >> 8;
    out.set(q.qs.subarray(b * qsBytes, (b + 1) * qsBytes), at + 2);
  }
  return out;
}

/**
 * Where a quantized tensor of `count` values lies in its GPU buffer: the qs of every block first
 * (ggml's bytes, in order), then the f16 scales, two per u32 word (block 2i in the low half).
 * Both regions start on a 4-byte boundary because count is a multiple of 32.
 */
export function gpuQuantLayout(format: QuantFormat, count: number): { qsBytes: number; scaleWordOffset: number } {
  const blocks = checkCount(`${format} tensor`, count);
  const qsBytes = blocks * QS_BYTES[format];
  return { qsBytes, scaleWordOffset: qsBytes / 4 };
}

/** The GPU buffer's bytes for these blocks (qs, then scales; see gpuQuantLayout). */
export function packQuantized(q: QuantizedBlocks): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(q.qs.byteLength + q.d.byteLength + (q.d.length & 1) * 2);
  out.set(q.qs, 0);
  out.set(new Uint8Array(q.d.buffer, q.d.byteOffset, q.d.byteLength), q.qs.byteLength);
  return out;
}

/** The inverse of packQuantized for `count` values. */
export function unpackQuantized(format: QuantFormat, bytes: Uint8Array, count: number): QuantizedBlocks {
  const { qsBytes } = gpuQuantLayout(format, count);
  const blocks = count / QUANT_BLOCK;
  if (bytes.byteLength < qsBytes + 2 * blocks) {
    throw new ShapeError(`${format}: ${bytes.byteLength} bytes cannot hold ${count} quantized values`);
  }
  const d = new Uint16Array(blocks);
  for (let b = 0; b < blocks; b++) {
    d[b] = (bytes[qsBytes + 2 * b] as number) | ((bytes[qsBytes + 2 * b + 1] as number) << 8);
  }
  return { format, qs: bytes.slice(0, qsBytes), d };
}
