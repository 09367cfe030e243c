import type { GpuContext } from './context.js';
import { ShapeError } from './errors.js';
import { packF16, unpackF16 } from './f16.js';
import {
  dequantize,
  isQuantFormat,
  packQuantized,
  QUANT_BLOCK,
  quantize,
  quantizedBytes,
  unpackQuantized,
} from './quant.js';
import { assertShape, formatShape, numel, type Shape } from './shape.js';

/**
 * f16 tensors are stored packed, two halves per u32, so they work without shader-f16. q8_0 and
 * q4_0 are llama.cpp's block formats (32 values per block along the last dimension, one f16 scale;
 * laid out as quant.ts's gpuQuantLayout says): frozen weights only.
 */
export type DType = 'f32' | 'f16' | 'i32' | 'u32' | 'q8_0' | 'q4_0';

/** Bytes per element; fractional for the block formats (34/32 and 18/32). */
export function bytesPerElement(dtype: DType): number {
  if (isQuantFormat(dtype)) return quantizedBytes(dtype, QUANT_BLOCK) / QUANT_BLOCK;
  return dtype === 'f16' ? 2 : 4;
}

/** A block format needs whole blocks along the last dimension (each row quantized on its own). */
function assertBlocks(label: string, shape: Shape, dtype: DType): void {
  const last = shape[shape.length - 1] as number;
  if (isQuantFormat(dtype) && last % QUANT_BLOCK !== 0) {
    throw new ShapeError(
      `${label}: ${dtype} needs the last dimension to be a multiple of ${QUANT_BLOCK}, got ${formatShape(shape)}`,
    );
  }
}

/**
 * A GPU buffer with a shape, a dtype and an explicit lifetime. Row-major. Nothing frees it but
 * `dispose()` (or destroying its context): GPU memory is never left to the garbage collector.
 */
export class Tensor {
  private released = false;

  /**
   * @param byteOffset where this tensor starts in `buffer`; non-zero only for views, whose buffer
   *   belongs to another tensor (an arena) and is not released by the view's dispose().
   */
  constructor(
    readonly ctx: GpuContext,
    readonly buffer: GPUBuffer,
    readonly shape: Shape,
    readonly dtype: DType,
    readonly label: string,
    readonly byteOffset = 0,
    private readonly owner?: Tensor,
  ) {}

  /** True for a view into another tensor's buffer. */
  get isView(): boolean {
    return this.owner !== undefined;
  }

  /** The byte range a kernel binds: the elements rounded up to 16 bytes (vec4 reads) where the
   * buffer has room, which it always has since buffers and view offsets are 16-aligned. */
  get bindingSize(): number {
    return Math.min(Math.ceil(this.byteLength / 16) * 16, this.buffer.size - this.byteOffset);
  }

  get size(): number {
    return numel(this.shape);
  }

  /** Bytes of the elements (the buffer itself is rounded up to 16). */
  get byteLength(): number {
    return this.size * bytesPerElement(this.dtype);
  }

  get disposed(): boolean {
    return this.released;
  }

  toString(): string {
    return `${this.label} ${this.dtype}${formatShape(this.shape)}`;
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    if (!this.owner) this.ctx.releaseBuffer(this.buffer);
  }
}

/**
 * A tensor over bytes [byteOffset, byteOffset + size) of `parent`'s buffer. The offset must be a
 * multiple of the device's minStorageBufferOffsetAlignment (256 on most), since kernels bind
 * views at their offset. Disposing a view releases nothing; disposing the parent releases all.
 */
export function tensorView(parent: Tensor, byteOffset: number, shape: Shape, dtype: DType, label: string): Tensor {
  assertShape(label, shape);
  assertBlocks(label, shape, dtype);
  const align = parent.ctx.limits.minStorageBufferOffsetAlignment;
  if (byteOffset % align !== 0) {
    throw new ShapeError(`${label}: view offset ${byteOffset} is not a multiple of ${align} bytes`);
  }
  const bytes = numel(shape) * bytesPerElement(dtype);
  if (byteOffset < 0 || byteOffset + bytes > parent.buffer.size) {
    throw new ShapeError(
      `${label}: bytes [${byteOffset}, ${byteOffset + bytes}) are outside ${parent.label} (${parent.buffer.size} bytes)`,
    );
  }
  return new Tensor(parent.ctx, parent.buffer, [...shape], dtype, label, parent.byteOffset + byteOffset, parent);
}

/**
 * Where TensorArena puts f32 tensors of these shapes: byte offsets, each a multiple of
 * max(16, minStorageBufferOffsetAlignment), and the arena's size in elements (at least 1).
 */
export function arenaLayout(
  shapes: readonly Shape[],
  minStorageBufferOffsetAlignment: number,
): { offsets: number[]; elements: number } {
  const align = Math.max(16, minStorageBufferOffsetAlignment);
  const offsets: number[] = [];
  let end = 0;
  for (const shape of shapes) {
    offsets.push(end);
    end += Math.ceil((numel(shape) * 4) / align) * align;
  }
  return { offsets, elements: Math.max(1, end / 4) };
}

/**
 * Many small tensors in one buffer, each at an aligned offset: LoRA's A and B matrices, their
 * gradients and the optimizer's moments live in arenas of identical layout, so the optimizer and
 * the gradient norm run as one dispatch over all of them.
 */
export class TensorArena {
  readonly tensor: Tensor;
  readonly views: readonly Tensor[];
  readonly offsets: readonly number[];

  constructor(ctx: GpuContext, entries: readonly { shape: Shape; label: string }[], label: string) {
    for (const e of entries) assertShape(e.label, e.shape);
    const layout = arenaLayout(
      entries.map((e) => e.shape),
      ctx.limits.minStorageBufferOffsetAlignment,
    );
    this.tensor = createTensor(ctx, [layout.elements], 'f32', label);
    const offsets = layout.offsets;
    this.offsets = offsets;
    this.views = entries.map((e, i) => tensorView(this.tensor, offsets[i] as number, e.shape, 'f32', e.label));
  }

  /** Elements in the whole arena, padding included (padding stays zero). */
  get size(): number {
    return this.tensor.size;
  }

  dispose(): void {
    for (const v of this.views) v.dispose();
    this.tensor.dispose();
  }
}

const TENSOR_USAGE = 0x80 /* STORAGE */ | 0x4 /* COPY_SRC */ | 0x8; /* COPY_DST */

/** Allocates an uninitialised (zero-filled by WebGPU) tensor. */
export function createTensor(ctx: GpuContext, shape: Shape, dtype: DType, label: string): Tensor {
  assertShape(label, shape);
  assertBlocks(label, shape, dtype);
  const buffer = ctx.createBuffer({
    label,
    size: numel(shape) * bytesPerElement(dtype),
    usage: TENSOR_USAGE,
    bindsAsStorage: true,
  });
  return new Tensor(ctx, buffer, [...shape], dtype, label);
}

/** Uploads host data. f16 tensors take f32 values and round them to nearest-even halves; q8_0 and
 * q4_0 tensors take f32 values and quantize them (quant.ts). */
export function tensorFromData(
  ctx: GpuContext,
  data: ArrayLike<number>,
  shape: Shape,
  dtype: DType,
  label: string,
): Tensor {
  assertShape(label, shape);
  if (data.length !== numel(shape)) {
    throw new ShapeError(
      `${label}: ${data.length} values given for shape ${formatShape(shape)} (${numel(shape)} elements)`,
    );
  }
  const t = createTensor(ctx, shape, dtype, label);
  writeTensor(t, data);
  return t;
}

export function writeTensor(t: Tensor, data: ArrayLike<number>): void {
  if (data.length !== t.size) {
    throw new ShapeError(`${t.label}: ${data.length} values given for ${formatShape(t.shape)}`);
  }
  const bytes = encode(data, t.dtype, t.label);
  t.ctx.device.queue.writeBuffer(t.buffer, t.byteOffset, bytes.buffer, bytes.byteOffset, alignBytes(bytes.byteLength));
}

function encode(
  data: ArrayLike<number>,
  dtype: DType,
  label: string,
): Float32Array | Int32Array | Uint32Array | Uint16Array | Uint8Array {
  switch (dtype) {
    case 'q8_0':
    case 'q4_0':
      return packQuantized(quantize(dtype, data, label));
    case 'f32':
      return data instanceof Float32Array ? data : Float32Array.from(data);
    case 'i32':
      return data instanceof Int32Array ? data : Int32Array.from(data);
    case 'u32':
      return data instanceof Uint32Array ? data : Uint32Array.from(data);
    case 'f16':
      return packF16(data);
  }
}

function alignBytes(n: number): number {
  return Math.ceil(n / 4) * 4;
}

/** Reads a tensor back to the host. f16, q8_0 and q4_0 tensors come back as f32 values. */
export async function readTensor(t: Tensor): Promise<Float32Array | Int32Array | Uint32Array> {
  const bytes = await readBytes(t.ctx, t.buffer, alignBytes(t.byteLength), `${t.label}.readback`, t.byteOffset);
  switch (t.dtype) {
    case 'f32':
      return new Float32Array(bytes, 0, t.size);
    case 'i32':
      return new Int32Array(bytes, 0, t.size);
    case 'u32':
      return new Uint32Array(bytes, 0, t.size);
    case 'f16':
      return unpackF16(new Uint16Array(bytes), t.size);
    case 'q8_0':
    case 'q4_0':
      return dequantize(unpackQuantized(t.dtype, new Uint8Array(bytes), t.size));
  }
}

/** Reads an f32 tensor; throws for other dtypes so callers cannot confuse integers with floats. */
export async function readFloat32(t: Tensor): Promise<Float32Array> {
  const data = await readTensor(t);
  if (!(data instanceof Float32Array)) throw new ShapeError(`${t.label} is ${t.dtype}, not a float tensor`);
  return data;
}

/** Copies `size` bytes of `buffer` into a staging buffer and maps it. Asynchronous: it waits for
 * the queue, never for a busy loop. */
export async function readBytes(
  ctx: GpuContext,
  buffer: GPUBuffer,
  size: number,
  label: string,
  offset = 0,
): Promise<ArrayBuffer> {
  ctx.assertAlive();
  const staging = ctx.createBuffer({ label, size, usage: 0x1 /* MAP_READ */ | 0x8 /* COPY_DST */ });
  try {
    const encoder = ctx.device.createCommandEncoder({ label });
    encoder.copyBufferToBuffer(buffer, offset, staging, 0, size);
    ctx.submit([encoder.finish()]);
    await ctx.mapRead(staging, 0, size);
    return staging.getMappedRange(0, size).slice(0);
  } finally {
    ctx.releaseBuffer(staging);
  }
}
