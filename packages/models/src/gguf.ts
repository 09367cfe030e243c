/**
 * GGUF (llama.cpp's model file) header reader: the metadata key/values and the tensor table,
 * validated before anything uses them, read through a ModelSource by byte range (a folder, a URL,
 * dropped files), so a multi-gigabyte file is never held in memory.
 *
 * Layout (little-endian; versions 2 and 3, whose counts and lengths are u64):
 *   "GGUF" u32 version, u64 tensor_count, u64 kv_count
 *   kv_count × (string key, u32 value_type, value)   string = u64 length + UTF-8 bytes
 *   tensor_count × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
 *   padding to general.alignment (default 32), then the data section; each tensor's offset is
 *   relative to it and a multiple of the alignment. ne[0] is the contiguous dimension: a
 *   [rows, cols] matrix has ne = [cols, rows].
 *
 * Why not @huggingface/gguf: it reads a URL through fetch or, under Node, a path, while our
 * models come through ModelSource (folders, URLs and the studio's dropped File objects alike); it
 * depends on @huggingface/tasks; and its errors are untyped strings. Reading the header is ~250
 * lines with the checks we need anyway (bounds, counts, overlaps, types) and typed errors that
 * name the file and the tensor, as safetensors.ts does.
 */
import { WebtuneError } from '@webtune/core';
import type { ModelSource } from './source.js';

/** A GGUF file we cannot read: malformed, truncated, or using what webtune does not support. */
export class GgufError extends WebtuneError {
  constructor(
    readonly file: string,
    /** The tensor or metadata key at fault, when one is. */
    readonly tensor: string | undefined,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}${tensor === undefined ? '' : `, "${tensor}"`}: ${reason}`, options);
  }
}

/** ggml's tensor types by id: values per block and bytes per block. */
export const GGML_TYPES: Readonly<
  Record<number, { readonly name: string; readonly block: number; readonly bytes: number }>
> = {
  0: { name: 'F32', block: 1, bytes: 4 },
  1: { name: 'F16', block: 1, bytes: 2 },
  2: { name: 'Q4_0', block: 32, bytes: 18 },
  3: { name: 'Q4_1', block: 32, bytes: 20 },
  6: { name: 'Q5_0', block: 32, bytes: 22 },
  7: { name: 'Q5_1', block: 32, bytes: 24 },
  8: { name: 'Q8_0', block: 32, bytes: 34 },
  9: { name: 'Q8_1', block: 32, bytes: 36 },
  10: { name: 'Q2_K', block: 256, bytes: 84 },
  11: { name: 'Q3_K', block: 256, bytes: 110 },
  12: { name: 'Q4_K', block: 256, bytes: 144 },
  13: { name: 'Q5_K', block: 256, bytes: 176 },
  14: { name: 'Q6_K', block: 256, bytes: 210 },
  15: { name: 'Q8_K', block: 256, bytes: 292 },
  16: { name: 'IQ2_XXS', block: 256, bytes: 66 },
  17: { name: 'IQ2_XS', block: 256, bytes: 74 },
  18: { name: 'IQ3_XXS', block: 256, bytes: 98 },
  19: { name: 'IQ1_S', block: 256, bytes: 50 },
  20: { name: 'IQ4_NL', block: 32, bytes: 18 },
  21: { name: 'IQ3_S', block: 256, bytes: 110 },
  22: { name: 'IQ2_S', block: 256, bytes: 82 },
  23: { name: 'IQ4_XS', block: 256, bytes: 136 },
  24: { name: 'I8', block: 1, bytes: 1 },
  25: { name: 'I16', block: 1, bytes: 2 },
  26: { name: 'I32', block: 1, bytes: 4 },
  27: { name: 'I64', block: 1, bytes: 8 },
  28: { name: 'F64', block: 1, bytes: 8 },
  29: { name: 'IQ1_M', block: 256, bytes: 56 },
  30: { name: 'BF16', block: 1, bytes: 2 },
};

export type GgufValue = number | bigint | boolean | string | readonly GgufValue[];

export interface GgufTensorInfo {
  readonly name: string;
  /** ggml type name: 'F16', 'Q8_0', ... (GGML_TYPES). */
  readonly type: string;
  /** Row-major shape (ne reversed): a matrix is [rows, cols]. */
  readonly shape: readonly number[];
  /** Absolute byte range in the file. */
  readonly begin: number;
  readonly end: number;
}

export interface GgufHeader {
  readonly file: string;
  readonly version: number;
  readonly metadata: ReadonlyMap<string, GgufValue>;
  /** In file order. */
  readonly tensors: ReadonlyMap<string, GgufTensorInfo>;
  readonly alignment: number;
  /** Where the data section starts. */
  readonly dataStart: number;
  readonly fileSize: number;
}

const MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Bytes of a value of each scalar type (strings and arrays have their own rule). */
const SCALAR_BYTES: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };
const STRING = 8;
const ARRAY = 9;

/** Reads a file front to back in growing chunks through `readRange`. */
class Cursor {
  private buf: Uint8Array = new Uint8Array(0);
  private view = new DataView(this.buf.buffer);
  /** File offset of buf[0]. */
  private base = 0;
  pos = 0;

  constructor(
    private readonly source: ModelSource,
    private readonly file: string,
    readonly size: number,
  ) {}

  fail(reason: string, tensor?: string): never {
    throw new GgufError(this.file, tensor, reason);
  }

  /** Makes bytes [pos, pos + n) available (reading at least 1 MiB more at a time). */
  async need(n: number, what: string): Promise<void> {
    if (this.pos + n > this.size) this.fail(`truncated: ${what} runs past the end of the file (${this.size} bytes)`);
    if (this.pos + n <= this.base + this.buf.byteLength) return;
    const start = this.pos;
    const end = Math.min(this.size, Math.max(start + n, start + 2 ** 20));
    this.buf = await this.source.readRange(this.file, start, end);
    this.view = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.base = start;
  }

  private at(n: number): number {
    const i = this.pos - this.base;
    this.pos += n;
    return i;
  }

  async u32(what: string): Promise<number> {
    await this.need(4, what);
    return this.view.getUint32(this.at(4), true);
  }

  /** A u64 that must be a safe integer (counts, lengths, offsets, dimensions). */
  async size64(what: string): Promise<number> {
    await this.need(8, what);
    const v = this.view.getBigUint64(this.at(8), true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) this.fail(`${what} ${v} is too large`);
    return Number(v);
  }

  async string(what: string): Promise<string> {
    const n = await this.size64(`${what}'s length`);
    await this.need(n, what);
    const i = this.at(n);
    try {
      return utf8.decode(this.buf.subarray(i, i + n));
    } catch {
      return this.fail(`${what} is not valid UTF-8`);
    }
  }

  async value(type: number, key: string, depth = 0): Promise<GgufValue> {
    if (type === STRING) return this.string(`the value of ${key}`);
    if (type === ARRAY) {
      if (depth > 2) this.fail(`arrays nested too deeply in ${key}`);
      const inner = await this.u32(`the element type of ${key}`);
      const count = await this.size64(`the length of ${key}`);
      const min = inner === STRING ? 8 : inner === ARRAY ? 12 : SCALAR_BYTES[inner];
      if (min === undefined) this.fail(`${key}: unknown value type ${inner}`);
      if (count * min > this.size - this.pos)
        this.fail(`truncated: ${key} holds ${count} values, more than the file has`);
      const out: GgufValue[] = new Array(count);
      if (inner !== STRING && inner !== ARRAY) await this.need(count * min, key);
      for (let i = 0; i < count; i++) out[i] = await this.value(inner, key, depth + 1);
      return out;
    }
    const bytes = SCALAR_BYTES[type];
    if (bytes === undefined) this.fail(`${key}: unknown value type ${type}`);
    await this.need(bytes, key);
    const i = this.at(bytes);
    const v = this.view;
    switch (type) {
      case 0:
        return v.getUint8(i);
      case 1:
        return v.getInt8(i);
      case 2:
        return v.getUint16(i, true);
      case 3:
        return v.getInt16(i, true);
      case 4:
        return v.getUint32(i, true);
      case 5:
        return v.getInt32(i, true);
      case 6:
        return v.getFloat32(i, true);
      case 7: {
        const b = v.getUint8(i);
        if (b > 1) this.fail(`${key}: boolean byte ${b}`);
        return b === 1;
      }
      case 10: {
        const x = v.getBigUint64(i, true);
        return x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : x;
      }
      case 11: {
        const x = v.getBigInt64(i, true);
        return x <= BigInt(Number.MAX_SAFE_INTEGER) && x >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(x) : x;
      }
      default:
        return v.getFloat64(i, true);
    }
  }
}

/** Reads and validates the header of `file` in `source`. */
export async function readGgufHeader(source: ModelSource, file: string): Promise<GgufHeader> {
  const size = await source.size(file);
  if (size === undefined) throw new GgufError(file, undefined, `not found in ${source.description}`);
  const c: Cursor = new Cursor(source, file, size);
  if ((await c.u32('the magic number')) !== MAGIC) c.fail('not a GGUF file (it does not start with "GGUF")');
  const version = await c.u32('the version');
  if (version !== 2 && version !== 3) c.fail(`GGUF version ${version} is not supported (2 and 3 are)`);
  const tensorCount = await c.size64('the tensor count');
  const kvCount = await c.size64('the metadata count');
  // Every entry takes at least a few bytes: a count beyond the file is corrupt, not big.
  if (tensorCount * 24 > size || kvCount * 12 > size)
    c.fail(`truncated or corrupt: ${tensorCount} tensors and ${kvCount} metadata keys cannot fit in ${size} bytes`);

  const metadata = new Map<string, GgufValue>();
  for (let i = 0; i < kvCount; i++) {
    const key = await c.string(`metadata key ${i}`);
    if (metadata.has(key)) c.fail('this metadata key is given twice', key);
    const type = await c.u32(`the type of ${key}`);
    metadata.set(key, await c.value(type, key));
  }
  const alignValue = metadata.get('general.alignment') ?? 32;
  if (typeof alignValue !== 'number' || alignValue < 1 || (alignValue & (alignValue - 1)) !== 0)
    c.fail(`general.alignment ${String(alignValue)} is not a power of two`);
  const alignment: number = alignValue;

  const raw: { name: string; type: number; ne: number[]; offset: number }[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < tensorCount; i++) {
    const name = await c.string(`tensor name ${i}`);
    if (seen.has(name)) c.fail('this tensor is listed twice', name);
    seen.add(name);
    const dims = await c.u32(`the dimension count of ${name}`);
    if (dims < 1 || dims > 4) c.fail(`${dims} dimensions (1 to 4 are possible)`, name);
    const ne: number[] = [];
    for (let d = 0; d < dims; d++) {
      const n = await c.size64(`a dimension of ${name}`);
      if (n < 1) c.fail(`dimension ${d} is ${n}`, name);
      ne.push(n);
    }
    const type = await c.u32(`the type of ${name}`);
    const offset = await c.size64(`the offset of ${name}`);
    raw.push({ name, type, ne, offset });
  }
  const dataStart = Math.ceil(c.pos / alignment) * alignment;

  const tensors = new Map<string, GgufTensorInfo>();
  for (const t of raw) {
    const info = GGML_TYPES[t.type];
    if (!info) c.fail(`unknown ggml type ${t.type}`, t.name);
    const count = t.ne.reduce((a, b) => a * b, 1);
    if ((t.ne[0] as number) % info.block !== 0)
      c.fail(`${info.name} rows of ${t.ne[0]} values are not whole blocks of ${info.block}`, t.name);
    if (t.offset % alignment !== 0)
      c.fail(`offset ${t.offset} is not a multiple of the alignment ${alignment}`, t.name);
    const bytes = (count / info.block) * info.bytes;
    const begin = dataStart + t.offset;
    if (!Number.isSafeInteger(bytes) || begin + bytes > size)
      c.fail(`truncated: its ${bytes} bytes at ${begin} run past the end of the file (${size} bytes)`, t.name);
    tensors.set(t.name, { name: t.name, type: info.name, shape: [...t.ne].reverse(), begin, end: begin + bytes });
  }
  const ordered = [...tensors.values()].sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < ordered.length; i++) {
    const prev = ordered[i - 1] as GgufTensorInfo;
    const cur = ordered[i] as GgufTensorInfo;
    if (cur.begin < prev.end) c.fail(`overlaps the data of ${prev.name}`, cur.name);
  }
  return { file, version, metadata, tensors, alignment, dataStart, fileSize: size };
}

/** A metadata value that must be there with a type: 'number' (a safe integer or a float), 'string'. */
export function ggufValue(h: GgufHeader, key: string, type: 'number', fallback?: number): number;
export function ggufValue(h: GgufHeader, key: string, type: 'string', fallback?: string): string;
export function ggufValue(h: GgufHeader, key: string, type: 'number' | 'string', fallback?: number | string) {
  const v = h.metadata.get(key);
  if (v === undefined) {
    if (fallback !== undefined) return fallback;
    throw new GgufError(h.file, key, 'this metadata key is missing');
  }
  if (typeof v !== type) throw new GgufError(h.file, key, `must be a ${type}, got ${JSON.stringify(String(v))}`);
  return v;
}
