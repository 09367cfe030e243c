import type { GpuContext } from './context.js';
import { ShapeError } from './errors.js';
import { packF16, unpackF16 } from './f16.js';
import { assertShape, formatShape, numel, type Shape } from './shape.js';

/** f16 tensors are stored packed, two halves per u32, so they work without shader-f16. */
export type DType = 'f32' | 'f16' | 'i32' | 'u32';

export function bytesPerElement(dtype: DType): number {
  return dtype === 'f16' ? 2 : 4;
}

/**
 * A GPU buffer with a shape, a dtype and an explicit lifetime. Row-major. Nothing frees it but
 * `dispose()` (or destroying its context): GPU memory is never left to the garbage collector.
 */
export class Tensor {
  private released = false;

  constructor(
    readonly ctx: GpuContext,
    readonly buffer: GPUBuffer,
    readonly shape: Shape,
    readonly dtype: DType,
    readonly label: string,
  ) {}

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
    this.ctx.releaseBuffer(this.buffer);
  }
}

const TENSOR_USAGE = 0x80 /* STORAGE */ | 0x4 /* COPY_SRC */ | 0x8; /* COPY_DST */

/** Allocates an uninitialised (zero-filled by WebGPU) tensor. */
export function createTensor(ctx: GpuContext, shape: Shape, dtype: DType, label: string): Tensor {
  assertShape(label, shape);
  const buffer = ctx.createBuffer({
    label,
    size: numel(shape) * bytesPerElement(dtype),
    usage: TENSOR_USAGE,
    bindsAsStorage: true,
  });
  return new Tensor(ctx, buffer, [...shape], dtype, label);
}

/** Uploads host data. f16 tensors take f32 values and round them to nearest-even halves. */
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
  const bytes = encode(data, t.dtype);
  t.ctx.device.queue.writeBuffer(t.buffer, 0, bytes.buffer, bytes.byteOffset, alignBytes(bytes.byteLength));
}

function encode(data: ArrayLike<number>, dtype: DType): Float32Array | Int32Array | Uint32Array | Uint16Array {
  switch (dtype) {
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

/** Reads a tensor back to the host. f16 tensors come back as f32 values. */
export async function readTensor(t: Tensor): Promise<Float32Array | Int32Array | Uint32Array> {
  const bytes = await readBytes(t.ctx, t.buffer, alignBytes(t.byteLength), `${t.label}.readback`);
  switch (t.dtype) {
    case 'f32':
      return new Float32Array(bytes, 0, t.size);
    case 'i32':
      return new Int32Array(bytes, 0, t.size);
    case 'u32':
      return new Uint32Array(bytes, 0, t.size);
    case 'f16':
      return unpackF16(new Uint16Array(bytes), t.size);
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
export async function readBytes(ctx: GpuContext, buffer: GPUBuffer, size: number, label: string): Promise<ArrayBuffer> {
  ctx.assertAlive();
  const staging = ctx.createBuffer({ label, size, usage: 0x1 /* MAP_READ */ | 0x8 /* COPY_DST */ });
  try {
    const encoder = ctx.device.createCommandEncoder({ label });
    encoder.copyBufferToBuffer(buffer, 0, staging, 0, size);
    ctx.device.queue.submit([encoder.finish()]);
    await Promise.race([staging.mapAsync(0x1 /* READ */, 0, size), ctx.lost.then((e) => Promise.reject(e))]);
    return staging.getMappedRange(0, size).slice(0);
  } finally {
    ctx.releaseBuffer(staging);
  }
}
