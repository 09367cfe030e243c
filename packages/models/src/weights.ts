/**
 * Weight upload: safetensors tensors -> GPU tensors, converted on the way, without a second full
 * copy in JS memory. A tensor is read by byte range in chunks (8 MiB by default), each chunk is
 * converted to the target dtype and written with queue.writeBuffer at its offset into a tensor
 * made by core's createTensor (which checks the device's limits first and names the tensor).
 *
 * Conversions (all exact except F32 -> f16 and BF16 -> f16, which round to nearest even):
 *   F32 -> f32 copy      F16 -> f32 widen      BF16 -> f32 widen (bits << 16)
 *   F32 -> f16 round     F16 -> f16 copy bits  BF16 -> f16 round (bf16 -> f32 is exact)
 * f16 tensors are packed two halves per u32, element 2i in the low 16 bits (core's layout).
 * q8_0 and q4_0 targets: each chunk (whole blocks of 32) is decoded to exact f32 values and
 * quantized with core's quantizer (ggml's reference rounding), its quants and scales written to
 * their places in core's GPU layout (quant.ts).
 */
import {
  createTensor,
  formatShape,
  type GpuContext,
  gpuQuantLayout,
  isQuantFormat,
  numel,
  packQuantized,
  QUANT_BLOCK,
  type QuantFormat,
  type QuantizedBlocks,
  quantize,
  type Shape,
  ShapeError,
  type Tensor,
} from '@webtune/core';
import { SafetensorsError } from './errors.js';
import {
  asU16,
  asU32,
  bf16ToF16BitsTable,
  DTYPE_BYTES,
  decodeToF32Bits,
  decodeToFloat32,
  type FloatDType,
  f32BitsToF16Bits,
  isFloatDType,
  type SafetensorsHeader,
  type StreamSafetensorsOptions,
  streamSafetensors,
  type TensorInfo,
  type TensorStore,
  unsupportedDType,
} from './safetensors.js';

export type WeightDType = 'f16' | 'f32' | QuantFormat;

export interface UploadOptions {
  /** dtype of the GPU tensor. */
  dtype: WeightDType;
  /** GPU label (default: the tensor's name). Limit errors name it. */
  label?: string;
  /** Shape of the GPU tensor when it differs from the file's (a transform's result, a reshape);
   * the element count must be the same. */
  shape?: Shape;
  /**
   * Rewrites the whole tensor before upload (GPT-2's Conv1D weights are stored [in, out] and
   * transposed to [out, in]). Gets the exact f32 values and returns as many values. This path
   * holds the tensor in JS memory, twice at most.
   */
  transform?: (data: Float32Array, info: TensorInfo) => Float32Array;
  /**
   * Finite values beyond f16's range (|x| > 65504) become ±inf in an f16 tensor. By default that
   * is a SafetensorsError naming the tensor (upload it as f32 instead); true lets them through.
   */
  allowOverflow?: boolean;
  /** Bytes of the file read per step (default 8 MiB). */
  chunkBytes?: number;
  /**
   * Upload only rows [start, start + count) of a 2-D tensor, as a [count, cols] GPU tensor: one part
   * of a table too large for one binding (core's table.ts). Not with `transform` or `shape`.
   */
  rows?: { readonly start: number; readonly count: number };
  /** Bytes of this tensor read so far, and its size in the file. */
  onProgress?: (loaded: number, total: number) => void;
  /** Stops the upload between chunks (the partly written tensor is released). */
  signal?: AbortSignal;
}

export const DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024;

function checkedTarget(info: TensorInfo, options: UploadOptions): { dtype: FloatDType; shape: Shape; label: string } {
  if (!isFloatDType(info.dtype)) throw unsupportedDType(info);
  if (options.dtype !== 'f16' && options.dtype !== 'f32' && !isQuantFormat(options.dtype)) {
    throw new ShapeError(`${info.name}: cannot upload as ${String(options.dtype)} (f16, f32, q8_0 or q4_0)`);
  }
  const label = options.label ?? info.name;
  if (options.rows) {
    const { start, count } = options.rows;
    const rows = info.shape[0] as number;
    if (info.shape.length !== 2 || options.transform || options.shape) {
      throw new ShapeError(
        `${label}: rows of ${info.name} can be uploaded from a 2-D tensor only, without a transform`,
      );
    }
    if (
      !Number.isSafeInteger(start) ||
      !Number.isSafeInteger(count) ||
      start < 0 ||
      count < 1 ||
      start + count > rows
    ) {
      throw new ShapeError(
        `${label}: rows [${start}, ${start + count}) are outside ${info.name} ${formatShape(info.shape)}`,
      );
    }
    return { dtype: info.dtype, shape: [count, info.shape[1] as number], label };
  }
  // A scalar (shape []) becomes a one-element tensor.
  const shape = options.shape ?? (info.shape.length === 0 ? [1] : info.shape);
  if (options.shape && numel(options.shape) !== numel(info.shape)) {
    throw new ShapeError(
      `${label}: shape ${formatShape(options.shape)} has ${numel(options.shape)} elements, ` +
        `but ${info.name} in ${info.file} is ${formatShape(info.shape)} (${numel(info.shape)} elements)`,
    );
  }
  return { dtype: info.dtype, shape, label };
}

/**
 * Converts `count` elements from `bytes` (of dtype `src`) and writes them at element `at` of `t`.
 * For f16 targets `at` must be even; an odd tail is padded with one zero half (the buffer is
 * rounded up to 16 bytes, so it stays inside it).
 */
class ChunkWriter {
  private f32: Uint32Array | undefined;
  private f16: Uint16Array | undefined;

  constructor(
    private readonly t: Tensor,
    private readonly src: FloatDType,
    private readonly info: TensorInfo,
    private readonly allowOverflow: boolean,
  ) {}

  write(at: number, bytes: Uint8Array): void {
    const count = bytes.byteLength / DTYPE_BYTES[this.src];
    const queue = this.t.ctx.device.queue;
    if (isQuantFormat(this.t.dtype)) {
      this.writeQuantized(this.t.dtype, at, bytes, count);
      return;
    }
    if (this.t.dtype === 'f32') {
      if (this.src === 'F32' && bytes.byteOffset % 4 === 0) {
        queue.writeBuffer(this.t.buffer, at * 4, bytes.buffer, bytes.byteOffset, bytes.byteLength);
        return;
      }
      const out = this.scratch32(count);
      decodeToF32Bits(this.src, bytes, out);
      queue.writeBuffer(this.t.buffer, at * 4, out.buffer, 0, count * 4);
      return;
    }
    if (at % 2 !== 0) throw new Error(`f16 chunk at odd element ${at}`); // an internal invariant
    const padded = count + (count & 1);
    if (this.src === 'F16' && count % 2 === 0 && bytes.byteOffset % 4 === 0) {
      queue.writeBuffer(this.t.buffer, at * 2, bytes.buffer, bytes.byteOffset, bytes.byteLength);
      return;
    }
    const out = this.scratch16(padded);
    if (this.src === 'F16') {
      out.set(asU16(bytes));
    } else {
      // Count finite inputs that round to ±inf (an exponent of all ones marks inf/NaN inputs).
      let overflow = 0;
      let worst = 0;
      if (this.src === 'F32') {
        const src = asU32(bytes);
        for (let i = 0; i < count; i++) {
          const x = src[i] as number;
          const h = f32BitsToF16Bits(x);
          out[i] = h;
          if ((h & 0x7fff) === 0x7c00 && (x & 0x7f800000) !== 0x7f800000) {
            overflow++;
            worst = i;
          }
        }
      } else {
        const table = bf16ToF16BitsTable();
        const src = asU16(bytes);
        for (let i = 0; i < count; i++) {
          const b = src[i] as number;
          const h = table[b] as number;
          out[i] = h;
          if ((h & 0x7fff) === 0x7c00 && (b & 0x7f80) !== 0x7f80) {
            overflow++;
            worst = i;
          }
        }
      }
      if (overflow > 0 && !this.allowOverflow) {
        const value = decodeToFloat32(
          this.src,
          bytes.subarray(worst * DTYPE_BYTES[this.src], (worst + 1) * DTYPE_BYTES[this.src]),
        )[0];
        throw new SafetensorsError(
          this.info.file,
          this.info.name,
          `${overflow} values (e.g. ${value}) are beyond f16's range of ±65504 and would become infinite; ` +
            'upload this tensor as f32 (or pass allowOverflow)',
        );
      }
    }
    if (padded !== count) out[count] = 0;
    queue.writeBuffer(this.t.buffer, at * 2, out.buffer, 0, padded * 2);
  }

  /**
   * Quantizes `count` values starting at element `at` (both whole, even numbers of blocks but for
   * the tensor's last chunk) and writes their quants and scales where core's layout puts them.
   */
  private writeQuantized(format: QuantFormat, at: number, bytes: Uint8Array, count: number): void {
    if (at % (2 * QUANT_BLOCK) !== 0) throw new Error(`quantized chunk at element ${at}`); // an internal invariant
    const values = new Float32Array(count);
    decodeToF32Bits(this.src, bytes, new Uint32Array(values.buffer));
    writeQuantizedBlocks(this.t, at / QUANT_BLOCK, quantize(format, values, this.t.label));
  }

  /** Writes f32 values (a transform's output) converted to the tensor's dtype. */
  writeValues(at: number, values: Float32Array): void {
    this.write(at, new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
  }

  private scratch32(count: number): Uint32Array {
    if (!this.f32 || this.f32.length < count) this.f32 = new Uint32Array(count);
    return this.f32;
  }

  private scratch16(count: number): Uint16Array {
    if (!this.f16 || this.f16.length < count) this.f16 = new Uint16Array(count);
    return this.f16;
  }
}

/**
 * Writes blocks of a q8_0 / q4_0 tensor from block `block` on (an even block, but for the
 * tensor's last ones): their quants and their scales, each where core's layout (quant.ts) puts it.
 */
export function writeQuantizedBlocks(t: Tensor, block: number, q: QuantizedBlocks): void {
  if (t.dtype !== q.format) throw new ShapeError(`${t.label}: ${q.format} blocks cannot go into a ${t.dtype} tensor`);
  if (block % 2 !== 0) throw new Error(`quantized write at odd block ${block}`); // an internal invariant
  const layout = gpuQuantLayout(q.format, t.size);
  const queue = t.ctx.device.queue;
  const perBlock = q.format === 'q8_0' ? 32 : 16;
  queue.writeBuffer(t.buffer, t.byteOffset + block * perBlock, q.qs);
  // packQuantized pads an odd count of scales to a whole word; the buffer is rounded up to 16
  // bytes, so the pad stays inside it.
  const scales = packQuantized({ format: q.format, qs: new Uint8Array(0), d: q.d });
  queue.writeBuffer(t.buffer, t.byteOffset + layout.qsBytes + block * 2, scales);
}

/**
 * Writes f32 values at element `at` of a tensor of any weight dtype, converted as an upload
 * converts them (f16 rounding with its overflow check, quantization): for loaders of other
 * formats (GGUF) that decode to f32 themselves. `at` must be even (f16) or a multiple of 64
 * (q8_0, q4_0).
 */
export function valueWriter(
  t: Tensor,
  where: { file: string; name: string },
): { write(at: number, values: Float32Array): void } {
  const info: TensorInfo = { name: where.name, file: where.file, dtype: 'F32', shape: t.shape, begin: 0, end: 0 };
  const writer = new ChunkWriter(t, 'F32', info, false);
  return { write: (at, values) => writer.writeValues(at, values) };
}

/** Elements per chunk: a whole, even number (f16 halves pair up into u32 words); for a quantized
 * target an even number of blocks (two f16 scales per u32 word). */
function chunkElements(src: FloatDType, chunkBytes: number, dtype: WeightDType): number {
  const n = Math.floor(chunkBytes / DTYPE_BYTES[src]);
  const unit = isQuantFormat(dtype) ? 2 * QUANT_BLOCK : 2;
  return Math.max(unit, n - (n % unit));
}

/**
 * Creates the GPU tensor (limits are checked before anything is read) and fills it from
 * `read(startByte, endByte)` over the tensor's bytes, chunk by chunk, or whole through the
 * transform.
 */
async function fillTensor(
  ctx: GpuContext,
  info: TensorInfo,
  options: UploadOptions,
  read: (start: number, end: number) => Uint8Array | Promise<Uint8Array>,
): Promise<Tensor> {
  const target = checkedTarget(info, options);
  // Bytes of the file to read (a range of rows, or the whole tensor) and where they start.
  const total = options.rows ? numel(target.shape) * DTYPE_BYTES[target.dtype] : info.end - info.begin;
  const first = options.rows ? options.rows.start * (info.shape[1] as number) * DTYPE_BYTES[target.dtype] : 0;
  const size = DTYPE_BYTES[target.dtype];
  const t = createTensor(ctx, target.shape, options.dtype, target.label);
  try {
    if (options.transform) {
      const values = new Float32Array(total / size);
      decodeToF32Bits(target.dtype, await read(0, total), new Uint32Array(values.buffer));
      options.onProgress?.(total, total);
      const result = options.transform(values, info);
      if (!(result instanceof Float32Array) || result.length !== values.length) {
        throw new ShapeError(
          `${target.label}: the transform of ${info.name} returned ${result instanceof Float32Array ? `${result.length} values` : String(result)}, expected ${values.length} values`,
        );
      }
      const writer = new ChunkWriter(t, 'F32', info, options.allowOverflow ?? false);
      const step = chunkElements('F32', options.chunkBytes ?? DEFAULT_CHUNK_BYTES, options.dtype);
      ctx.assertAlive();
      for (let at = 0; at < result.length; at += step) writer.writeValues(at, result.subarray(at, at + step));
      return t;
    }
    const writer = new ChunkWriter(t, target.dtype, info, options.allowOverflow ?? false);
    const step = chunkElements(target.dtype, options.chunkBytes ?? DEFAULT_CHUNK_BYTES, options.dtype);
    for (let at = 0; at * size < total; at += step) {
      options.signal?.throwIfAborted();
      const end = Math.min(total, (at + step) * size);
      const bytes = await read(first + at * size, first + end);
      ctx.assertAlive();
      writer.write(at, bytes);
      options.onProgress?.(end, total);
    }
    return t;
  } catch (error) {
    t.dispose();
    throw error;
  }
}

/**
 * Uploads one tensor from a safetensors file (or a sharded model) to a new GPU tensor, reading
 * it in chunks. The caller owns the returned tensor (dispose it).
 */
export async function uploadTensor(
  ctx: GpuContext,
  store: TensorStore,
  name: string,
  options: UploadOptions,
): Promise<Tensor> {
  const file = await store.fileOf(name);
  return fillTensor(ctx, file.info(name), options, (start, end) => file.readBytes(name, start, end));
}

/**
 * Uploads a tensor whose bytes are already in memory (from streamSafetensors), converting and
 * writing them in chunks, so the only extra memory is one chunk.
 */
export async function uploadTensorBytes(
  ctx: GpuContext,
  info: TensorInfo,
  bytes: Uint8Array,
  options: UploadOptions,
): Promise<Tensor> {
  if (bytes.byteLength !== info.end - info.begin) {
    throw new ShapeError(
      `${options.label ?? info.name}: ${bytes.byteLength} bytes given for ${info.name}, which has ${info.end - info.begin}`,
    );
  }
  return fillTensor(ctx, info, options, (start, end) => bytes.subarray(start, end));
}

/**
 * Uploads the tensors of a one-shot safetensors stream (a fetch body, File.stream()) as they
 * arrive. `select` says, per tensor, how to upload it, or undefined to skip it. Returns the
 * tensors by name; on any error every tensor made so far is released.
 */
export async function uploadSafetensorsStream(
  ctx: GpuContext,
  stream: ReadableStream<Uint8Array>,
  select: (info: TensorInfo) => Omit<UploadOptions, 'onProgress' | 'signal'> | undefined,
  options: StreamSafetensorsOptions = {},
): Promise<{ header: SafetensorsHeader; tensors: Map<string, Tensor> }> {
  const tensors = new Map<string, Tensor>();
  try {
    const header = await streamSafetensors(
      stream,
      async (info, bytes) => {
        const how = select(info);
        if (how) tensors.set(info.name, await uploadTensorBytes(ctx, info, bytes, how));
      },
      options,
    );
    return { header, tensors };
  } catch (error) {
    for (const t of tensors.values()) t.dispose();
    throw error;
  }
}

/** Transposes a row-major [rows, cols] matrix to [cols, rows] (for GPT-2's Conv1D weights). */
export function transpose2d(data: Float32Array, rows: number, cols: number): Float32Array {
  if (data.length !== rows * cols) {
    throw new ShapeError(`transpose2d: ${data.length} values for [${rows}, ${cols}]`);
  }
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[c * rows + r] = data[r * cols + c] as number;
  }
  return out;
}
