/**
 * safetensors: an 8-byte little-endian header length N, N bytes of JSON
 * ({"__metadata__": {str: str}, name: {dtype, shape, data_offsets: [begin, end]}, ...}, padded
 * with spaces), then the tensors' bytes, little-endian, row-major; offsets are relative to the
 * end of the header.
 *
 * The header is validated before anything in it is trusted (sizes, offsets, overlaps), as
 * strictly as the reference implementation (Python's `safetensors`): the tensors must tile the
 * data section exactly, with no gaps, overlaps or trailing bytes. Files are read through a
 * ModelSource by byte range, so opening a file reads only its header.
 */
import { f32BitsToF16Bits, f32ToF16Bits, WebtuneError } from '@webtune/core';

// Bulk f32 -> f16 conversion lives in core; re-exported for this module's users.
export { f32BitsToF16Bits };

import { ModelFileError, SafetensorsError } from './errors.js';
import { checkFileName, type ModelSource } from './source.js';

/** Every dtype the format defines with a whole number of bytes per element. */
export type SafetensorsDType =
  | 'BOOL'
  | 'U8'
  | 'I8'
  | 'F8_E5M2'
  | 'F8_E4M3'
  | 'F8_E8M0'
  | 'I16'
  | 'U16'
  | 'F16'
  | 'BF16'
  | 'I32'
  | 'U32'
  | 'F32'
  | 'F64'
  | 'I64'
  | 'U64';

/** The dtypes webtune reads and writes. Others are accepted in a header (so a checkpoint with an
 * integer buffer such as `position_ids` still opens), but reading such a tensor is an error. */
export type FloatDType = 'F32' | 'F16' | 'BF16';

export const DTYPE_BYTES: Readonly<Record<SafetensorsDType, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  F8_E8M0: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

export function isFloatDType(dtype: string): dtype is FloatDType {
  return dtype === 'F32' || dtype === 'F16' || dtype === 'BF16';
}

function isKnownDType(dtype: string): dtype is SafetensorsDType {
  return Object.hasOwn(DTYPE_BYTES, dtype);
}

/** One tensor of a file. Offsets are absolute positions in the file: [begin, end). */
export interface TensorInfo {
  readonly name: string;
  /** The file that holds it. */
  readonly file: string;
  readonly dtype: SafetensorsDType;
  readonly shape: readonly number[];
  readonly begin: number;
  readonly end: number;
}

export interface SafetensorsHeader {
  readonly file: string;
  /** N: bytes of JSON (with its padding) after the 8-byte length. */
  readonly headerLength: number;
  /** 8 + N: where the data section starts. */
  readonly dataStart: number;
  /** Size of the whole file (Infinity when it was parsed from a stream of unknown length). */
  readonly fileSize: number;
  /** Tensors in file order (by offset). */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** The `__metadata__` map, or undefined when the file has none. */
  readonly metadata: Readonly<Record<string, string>> | undefined;
}

/** Headers longer than this are refused (the limit Python's safetensors applies too). */
export const MAX_HEADER_BYTES = 100_000_000;

const METADATA_KEY = '__metadata__';

/**
 * Reads and checks the 8-byte header length N from the first bytes of a file of `fileSize`
 * bytes. Returns N.
 */
export function readHeaderLength(prefix: Uint8Array, file: string, fileSize: number = prefix.byteLength): number {
  if (fileSize < 8 || prefix.byteLength < 8) {
    throw new SafetensorsError(
      file,
      undefined,
      `${Math.min(fileSize, prefix.byteLength)} bytes is too short for a safetensors file (it starts with an 8-byte header length)`,
    );
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) {
    throw new SafetensorsError(
      file,
      undefined,
      `header length ${n} is over the ${MAX_HEADER_BYTES}-byte limit: not a safetensors file, or a corrupt one`,
    );
  }
  const length = Number(n);
  if (8 + length > fileSize) {
    throw new SafetensorsError(
      file,
      undefined,
      `header length ${length} runs past the end of the file (${fileSize} bytes): the file is truncated or not safetensors`,
    );
  }
  return length;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string')
    return `the string ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)}`;
  if (typeof value === 'object') return 'an object';
  return `${typeof value} ${String(value)}`;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** A non-negative safe integer (JSON's "-0" is refused: no writer produces it). */
function isIndex(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0 && !Object.is(value, -0);
}

/** Elements of a shape, or undefined when the count is not a safe integer. */
function elementCount(shape: readonly number[]): number | undefined {
  if (shape.includes(0)) return 0;
  let n = 1;
  for (const d of shape) {
    n *= d;
    if (!Number.isSafeInteger(n)) return undefined;
  }
  return n;
}

/**
 * Parses and validates a header. `bytes` holds the file from its start, at least through the
 * header; `fileSize` is the size of the whole file (pass Infinity for a stream of unknown length:
 * the checks against the end of the file are then left to the reader of the stream).
 */
export function parseSafetensorsHeader(
  bytes: Uint8Array,
  file: string,
  fileSize: number = bytes.byteLength,
): SafetensorsHeader {
  const fail = (reason: string, tensor?: string): never => {
    throw new SafetensorsError(file, tensor, reason);
  };
  const headerLength = readHeaderLength(bytes, file, fileSize);
  const dataStart = 8 + headerLength;
  if (bytes.byteLength < dataStart) {
    fail(`only ${bytes.byteLength} bytes given, the header needs ${dataStart}`);
  }
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes.subarray(8, dataStart));
  } catch {
    return fail('the header is not valid UTF-8');
  }
  if (!text.startsWith('{')) fail('the header is not a JSON object (it must start with "{")');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    return fail(`the header is not valid JSON (${(error as Error).message})`);
  }
  if (!isPlainObject(json)) return fail(`the header is ${describe(json)}, not a JSON object`);

  const dataSize = fileSize - dataStart;
  let metadata: Record<string, string> | undefined;
  const tensors: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(json)) {
    if (name === METADATA_KEY) {
      if (!isPlainObject(entry)) return fail(`${METADATA_KEY} is ${describe(entry)}, not an object of strings`);
      metadata = {};
      for (const [key, value] of Object.entries(entry)) {
        if (typeof value !== 'string') {
          return fail(`${METADATA_KEY}["${key}"] is ${describe(value)}; metadata values must be strings`);
        }
        metadata[key] = value;
      }
      continue;
    }
    if (!isPlainObject(entry)) return fail(`the entry is ${describe(entry)}, not an object`, name);
    const { dtype, shape, data_offsets: offsets } = entry;
    if (typeof dtype !== 'string') return fail(`dtype is ${describe(dtype)}, not a string`, name);
    if (!isKnownDType(dtype)) {
      return fail(
        `unsupported dtype ${JSON.stringify(dtype)} (webtune reads F32, F16 and BF16; the format also ` +
          'defines BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F64 and 8-bit floats)',
        name,
      );
    }
    if (!Array.isArray(shape) || !shape.every(isIndex)) {
      return fail(
        `shape is ${describe(shape)}${Array.isArray(shape) ? ` [${shape.join(', ')}]` : ''}, not a list of non-negative integers`,
        name,
      );
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isIndex)) {
      return fail(
        `data_offsets is ${describe(offsets)}${Array.isArray(offsets) ? ` [${offsets.join(', ')}]` : ''}, not [begin, end] with non-negative integers`,
        name,
      );
    }
    const [begin, end] = offsets as [number, number];
    if (begin > end) return fail(`data_offsets [${begin}, ${end}] end before they begin`, name);
    if (end > dataSize) {
      return fail(
        `data_offsets [${begin}, ${end}] run past the end of the data section (${dataSize} bytes after the ${dataStart}-byte header)`,
        name,
      );
    }
    const count = elementCount(shape);
    const bytesNeeded = count === undefined ? undefined : count * DTYPE_BYTES[dtype];
    if (bytesNeeded !== end - begin) {
      return fail(
        `dtype ${dtype} with shape [${shape.join(', ')}] needs ${bytesNeeded ?? 'more than 2^53'} bytes, but data_offsets [${begin}, ${end}] hold ${end - begin}`,
        name,
      );
    }
    tensors.push({ name, file, dtype, shape: [...shape], begin: dataStart + begin, end: dataStart + end });
  }

  // The tensors must tile the data section: sorted by offset, each starts where the last ended.
  tensors.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = dataStart;
  let previous: TensorInfo | undefined;
  for (const t of tensors) {
    const rel = (x: number) => x - dataStart;
    if (t.begin < cursor) {
      fail(
        `data_offsets [${rel(t.begin)}, ${rel(t.end)}] overlap those of "${previous?.name}" [${rel(previous?.begin ?? 0)}, ${rel(cursor)}]`,
        t.name,
      );
    }
    if (t.begin > cursor) {
      fail(
        `data_offsets [${rel(t.begin)}, ${rel(t.end)}] leave a gap of ${t.begin - cursor} unused bytes before them`,
        t.name,
      );
    }
    cursor = t.end;
    previous = t;
  }
  if (Number.isFinite(fileSize) && cursor !== fileSize) {
    fail(
      `${fileSize - cursor} bytes after the last tensor belong to no tensor (the file is longer than its header says)`,
    );
  }
  return {
    file,
    headerLength,
    dataStart,
    fileSize,
    tensors: new Map(tensors.map((t) => [t.name, t])),
    metadata,
  };
}

// ---------------------------------------------------------------------------------------------
// Conversions to f32

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function assertLittleEndian(): void {
  if (!LITTLE_ENDIAN) throw new WebtuneError('webtune reads safetensors only on little-endian machines');
}

/** The bytes as 16-bit words (copied when they do not start on an even address). */
export function asU16(bytes: Uint8Array): Uint16Array {
  assertLittleEndian();
  if (bytes.byteOffset % 2 === 0) return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 1);
  return new Uint16Array(bytes.slice().buffer, 0, bytes.byteLength >>> 1);
}

/** The bytes as 32-bit words (copied when they do not start on a multiple of 4). */
export function asU32(bytes: Uint8Array): Uint32Array {
  assertLittleEndian();
  if (bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 2);
  return new Uint32Array(bytes.slice().buffer, 0, bytes.byteLength >>> 2);
}

// Conversion loops store through Int32Array views: values with the top bit set stay small
// integers there, where a Uint32Array store of them takes V8's slow (double) path.
let f16Table: Int32Array | undefined;

function f16ToF32Table(): Int32Array {
  if (f16Table) return f16Table;
  const table = new Int32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exp = (h >>> 10) & 0x1f;
    let mant = h & 0x3ff;
    if (exp === 0x1f) {
      table[h] = sign | 0x7f800000 | (mant << 13);
    } else if (exp !== 0) {
      table[h] = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant === 0) {
      table[h] = sign;
    } else {
      // Subnormal half: shift the mantissa up until its leading one reaches the implicit bit.
      let e = 113;
      while ((mant & 0x400) === 0) {
        mant <<= 1;
        e--;
      }
      table[h] = sign | (e << 23) | ((mant & 0x3ff) << 13);
    }
  }
  f16Table = table;
  return table;
}

/** f32 bits of each of the 65,536 halves, built bitwise, so NaN payloads survive too. */
export function f16ToF32BitsTable(): Uint32Array {
  return new Uint32Array(f16ToF32Table().buffer);
}

let bf16ToF16Table: Uint16Array | undefined;

/** f16 bits of each of the 65,536 bfloat16 values, rounded by core's f32ToF16Bits (a bfloat16 is
 * an exact f32, so this is the one rounding). */
export function bf16ToF16BitsTable(): Uint16Array {
  if (bf16ToF16Table) return bf16ToF16Table;
  const table = new Uint16Array(65536);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let b = 0; b < 65536; b++) {
    u[0] = b << 16;
    table[b] = f32ToF16Bits(f[0] as number);
  }
  bf16ToF16Table = table;
  return table;
}

/** f32 -> bfloat16 bits, round to nearest even; NaN becomes the quiet NaN 0x7fc0. */
export function f32ToBf16Bits(value: number): number {
  bf16Scratch[0] = value;
  const bits = bf16Bits[0] as number;
  if (Number.isNaN(value)) return 0x7fc0;
  return (bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16;
}
const bf16Scratch = new Float32Array(1);
const bf16Bits = new Uint32Array(bf16Scratch.buffer);

/**
 * Decodes `bytes` of a F32, F16 or BF16 tensor into f32 bits written to `out` (which must hold
 * bytes / elementSize values). Exact: every F16 and BF16 value is an f32 value.
 */
export function decodeToF32Bits(dtype: FloatDType, bytes: Uint8Array, out: Uint32Array): void {
  const o = new Int32Array(out.buffer, out.byteOffset, out.length);
  switch (dtype) {
    case 'F32':
      out.set(asU32(bytes));
      return;
    case 'F16': {
      const table = f16ToF32Table();
      const src = asU16(bytes);
      for (let i = 0; i < src.length; i++) o[i] = table[src[i] as number] as number;
      return;
    }
    case 'BF16': {
      const src = asU16(bytes);
      for (let i = 0; i < src.length; i++) o[i] = (src[i] as number) << 16;
      return;
    }
  }
}

/** The tensor's values as f32 (exact for F32, F16 and BF16). */
export function decodeToFloat32(dtype: FloatDType, bytes: Uint8Array): Float32Array {
  const out = new Float32Array(bytes.byteLength / DTYPE_BYTES[dtype]);
  decodeToF32Bits(dtype, bytes, new Uint32Array(out.buffer));
  return out;
}

export function unsupportedDType(info: TensorInfo): SafetensorsError {
  return new SafetensorsError(
    info.file,
    info.name,
    `dtype ${info.dtype} is not supported here (webtune reads F32, F16 and BF16 tensors)`,
  );
}

// ---------------------------------------------------------------------------------------------
// Files through a ModelSource

/** Anything that can say which file holds a tensor: one SafetensorsFile or a (sharded) model. */
export interface TensorStore {
  /** The open file that holds `name`; rejects with SafetensorsError when no file has it. */
  fileOf(name: string): Promise<SafetensorsFile>;
}

/** An opened safetensors file: its validated header, and reads of its tensors by byte range. */
export class SafetensorsFile implements TensorStore {
  constructor(
    readonly source: ModelSource,
    readonly header: SafetensorsHeader,
  ) {}

  get name(): string {
    return this.header.file;
  }

  get metadata(): Readonly<Record<string, string>> | undefined {
    return this.header.metadata;
  }

  get tensors(): ReadonlyMap<string, TensorInfo> {
    return this.header.tensors;
  }

  /** Tensor names in file order. */
  names(): string[] {
    return [...this.header.tensors.keys()];
  }

  has(name: string): boolean {
    return this.header.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const info = this.header.tensors.get(name);
    if (!info) throw new SafetensorsError(this.name, name, 'no such tensor in this file');
    return info;
  }

  async fileOf(name: string): Promise<SafetensorsFile> {
    this.info(name);
    return this;
  }

  /** Bytes [begin + start, begin + end) of a tensor's data (little-endian, as stored). */
  async readBytes(name: string, start = 0, end?: number): Promise<Uint8Array> {
    const info = this.info(name);
    const stop = end ?? info.end - info.begin;
    if (
      !(
        Number.isSafeInteger(start) &&
        Number.isSafeInteger(stop) &&
        start >= 0 &&
        start <= stop &&
        info.begin + stop <= info.end
      )
    ) {
      throw new SafetensorsError(
        this.name,
        name,
        `byte range [${start}, ${stop}) is outside the tensor's ${info.end - info.begin} bytes`,
      );
    }
    const bytes = await this.source.readRange(this.name, info.begin + start, info.begin + stop);
    if (bytes.byteLength !== stop - start) {
      throw new ModelFileError(
        this.source.description,
        this.name,
        `read ${bytes.byteLength} bytes, expected ${stop - start}`,
      );
    }
    return bytes;
  }

  /** The whole tensor as f32 values (exact conversions from F16 and BF16). */
  async readTensor(name: string): Promise<Float32Array> {
    const info = this.info(name);
    if (!isFloatDType(info.dtype)) throw unsupportedDType(info);
    return decodeToFloat32(info.dtype, await this.readBytes(name));
  }
}

/** Bytes read up front when opening a file: most headers fit, so one request usually suffices. */
const HEADER_PREFETCH = 256 * 1024;

/** Opens a safetensors file, reading only its header. */
export async function openSafetensors(source: ModelSource, fileName: string): Promise<SafetensorsFile> {
  const size = await source.size(fileName);
  if (size === undefined) throw new ModelFileError(source.description, fileName, 'no such file');
  if (size < 8) {
    throw new SafetensorsError(
      fileName,
      undefined,
      `${size} bytes is too short for a safetensors file (it starts with an 8-byte header length)`,
    );
  }
  let bytes = await source.readRange(fileName, 0, Math.min(size, HEADER_PREFETCH));
  const dataStart = 8 + readHeaderLength(bytes, fileName, size);
  if (dataStart > bytes.byteLength) {
    const rest = await source.readRange(fileName, bytes.byteLength, dataStart);
    const all = new Uint8Array(dataStart);
    all.set(bytes);
    all.set(rest, bytes.byteLength);
    bytes = all;
  }
  return new SafetensorsFile(source, parseSafetensorsHeader(bytes.subarray(0, dataStart), fileName, size));
}

// ---------------------------------------------------------------------------------------------
// Whole models: model.safetensors or model.safetensors.index.json + shards

export interface ModelWeightsOptions {
  /** Name of the single-file checkpoint (default "model.safetensors"). */
  weightsName?: string;
  /** Name of the shard index (default weightsName + ".index.json"). */
  indexName?: string;
}

/**
 * A model's weights, one file or sharded. Shards are opened (their headers read) on first use;
 * opening a shard checks that it holds every tensor the index assigns to it.
 */
export class ModelWeights implements TensorStore {
  private readonly opened = new Map<string, Promise<SafetensorsFile>>();

  constructor(
    readonly source: ModelSource,
    /** The file that lists the tensors: the index, or the single checkpoint. */
    readonly listing: string,
    /** Tensor name -> file that holds it. */
    readonly weightMap: ReadonlyMap<string, string>,
    /** The index's "metadata" (e.g. total_size), or the single file's __metadata__. */
    readonly metadata: Readonly<Record<string, unknown>> | undefined,
    single?: SafetensorsFile,
  ) {
    if (single) this.opened.set(single.name, Promise.resolve(single));
  }

  /** Tensor names (index order, or file order for a single file). */
  names(): string[] {
    return [...this.weightMap.keys()];
  }

  has(name: string): boolean {
    return this.weightMap.has(name);
  }

  /** The distinct files, in order of first appearance. */
  files(): string[] {
    return [...new Set(this.weightMap.values())];
  }

  fileOf(name: string): Promise<SafetensorsFile> {
    const file = this.weightMap.get(name);
    if (file === undefined)
      return Promise.reject(new SafetensorsError(this.listing, name, 'no such tensor in the model'));
    return this.open(file);
  }

  async info(name: string): Promise<TensorInfo> {
    return (await this.fileOf(name)).info(name);
  }

  /** Every tensor's info (opens every shard). */
  async infos(): Promise<Map<string, TensorInfo>> {
    const out = new Map<string, TensorInfo>();
    const files = await Promise.all(this.files().map((f) => this.open(f)));
    const byName = new Map(files.map((f) => [f.name, f]));
    for (const [name, file] of this.weightMap) out.set(name, (byName.get(file) as SafetensorsFile).info(name));
    return out;
  }

  async readTensor(name: string): Promise<Float32Array> {
    return (await this.fileOf(name)).readTensor(name);
  }

  private open(file: string): Promise<SafetensorsFile> {
    let pending = this.opened.get(file);
    if (!pending) {
      pending = openSafetensors(this.source, file).then((opened) => {
        for (const [name, owner] of this.weightMap) {
          if (owner === file && !opened.has(name)) {
            throw new SafetensorsError(file, name, `listed for this file in ${this.listing}, but missing from it`);
          }
        }
        return opened;
      });
      this.opened.set(file, pending);
      // A failed open (a network error, say) is not remembered: the next call tries again.
      pending.catch(() => this.opened.delete(file));
    }
    return pending;
  }
}

/**
 * Opens a model's weights: model.safetensors when present, otherwise
 * model.safetensors.index.json and its shards (opened lazily).
 */
export async function openModelWeights(source: ModelSource, options: ModelWeightsOptions = {}): Promise<ModelWeights> {
  const weightsName = options.weightsName ?? 'model.safetensors';
  const indexName = options.indexName ?? `${weightsName}.index.json`;
  if ((await source.size(weightsName)) !== undefined) {
    const file = await openSafetensors(source, weightsName);
    const map = new Map(file.names().map((n) => [n, weightsName]));
    return new ModelWeights(source, weightsName, map, file.metadata, file);
  }
  const text = await source.readText(indexName);
  if (text === undefined) {
    throw new ModelFileError(source.description, weightsName, `no such file, and no ${indexName} either`);
  }
  const fail = (reason: string, tensor?: string): never => {
    throw new SafetensorsError(indexName, tensor, reason);
  };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    return fail(`not valid JSON (${(error as Error).message})`);
  }
  if (!isPlainObject(json)) return fail(`the index is ${describe(json)}, not a JSON object`);
  const weightMap = json.weight_map;
  if (!isPlainObject(weightMap)) return fail(`weight_map is ${describe(weightMap)}, not an object`);
  const map = new Map<string, string>();
  for (const [name, file] of Object.entries(weightMap)) {
    if (typeof file !== 'string') return fail(`weight_map gives ${describe(file)} instead of a file name`, name);
    try {
      checkFileName(source.description, file);
    } catch {
      return fail(`weight_map names ${JSON.stringify(file)}, which is not a file inside the model`, name);
    }
    map.set(name, file);
  }
  if (map.size === 0) fail('weight_map lists no tensors');
  const metadata = isPlainObject(json.metadata) ? json.metadata : undefined;
  return new ModelWeights(source, indexName, map, metadata);
}

// ---------------------------------------------------------------------------------------------
// Writing

export type SerializableTensor =
  | {
      readonly name: string;
      readonly dtype: FloatDType;
      readonly shape: readonly number[];
      /** Values; rounded to f32 and then to the dtype (round to nearest even). */
      readonly data: ArrayLike<number>;
    }
  | {
      readonly name: string;
      readonly dtype: FloatDType;
      readonly shape: readonly number[];
      /** The stored bytes themselves, little-endian. */
      readonly bytes: Uint8Array;
    };

// Python's safetensors orders tensors by dtype, larger dtypes first in its enum order
// (... F16 < BF16 < ... < F32 ...), then by name.
const DTYPE_RANK: Readonly<Record<FloatDType, number>> = { F16: 0, BF16: 1, F32: 2 };

/** Orders strings by their UTF-8 bytes, as Rust's String comparison does. */
function compareUtf8(a: string, b: string): number {
  const ea = utf8.encode(a);
  const eb = utf8.encode(b);
  const n = Math.min(ea.length, eb.length);
  for (let i = 0; i < n; i++) {
    const d = (ea[i] as number) - (eb[i] as number);
    if (d !== 0) return d;
  }
  return ea.length - eb.length;
}
const utf8 = new TextEncoder();

function encodeTensor(t: SerializableTensor, count: number): Uint8Array {
  const size = DTYPE_BYTES[t.dtype];
  if ('bytes' in t) {
    if (t.bytes.byteLength !== count * size) {
      throw new SafetensorsError(
        '(serialized)',
        t.name,
        `${t.bytes.byteLength} bytes given for ${t.dtype} [${t.shape.join(', ')}] (${count * size} bytes)`,
      );
    }
    return t.bytes;
  }
  if (t.data.length !== count) {
    throw new SafetensorsError(
      '(serialized)',
      t.name,
      `${t.data.length} values given for shape [${t.shape.join(', ')}] (${count} elements)`,
    );
  }
  switch (t.dtype) {
    case 'F32':
      return new Uint8Array(Float32Array.from(t.data).buffer);
    case 'F16': {
      const out = new Uint16Array(count);
      for (let i = 0; i < count; i++) out[i] = f32ToF16Bits(t.data[i] as number);
      return new Uint8Array(out.buffer);
    }
    case 'BF16': {
      const out = new Uint16Array(count);
      for (let i = 0; i < count; i++) out[i] = f32ToBf16Bits(t.data[i] as number);
      return new Uint8Array(out.buffer);
    }
  }
}

/**
 * Writes a safetensors file byte-identical to Python's `safetensors.torch.save_file` /
 * `save` for the same tensors and metadata: compact JSON with `__metadata__` first (omitted
 * when `metadata` is undefined), tensors ordered F32, BF16, F16 and by name within a dtype,
 * header padded with spaces to a multiple of 8. (Python writes a metadata map with more than one
 * key in an arbitrary order; here keys keep their insertion order.)
 */
export function serializeSafetensors(
  tensors: readonly SerializableTensor[],
  metadata?: Readonly<Record<string, string>>,
): Uint8Array {
  assertLittleEndian();
  const seen = new Set<string>();
  for (const t of tensors) {
    if (t.name === METADATA_KEY)
      throw new SafetensorsError('(serialized)', t.name, 'this name is reserved for metadata');
    if (seen.has(t.name)) throw new SafetensorsError('(serialized)', t.name, 'given twice');
    seen.add(t.name);
    if (!isFloatDType(t.dtype))
      throw new SafetensorsError('(serialized)', t.name, `dtype ${String(t.dtype)} cannot be written (F32, F16, BF16)`);
    if (!Array.isArray(t.shape) || !t.shape.every(isIndex)) {
      throw new SafetensorsError(
        '(serialized)',
        t.name,
        `shape [${String(t.shape)}] is not a list of non-negative integers`,
      );
    }
  }
  const ordered = [...tensors].sort((a, b) => DTYPE_RANK[b.dtype] - DTYPE_RANK[a.dtype] || compareUtf8(a.name, b.name));
  const parts: string[] = [];
  if (metadata !== undefined) {
    const entries = Object.entries(metadata).map(([k, v]) => {
      if (typeof v !== 'string')
        throw new SafetensorsError('(serialized)', undefined, `metadata "${k}" is not a string`);
      return `${JSON.stringify(k)}:${JSON.stringify(v)}`;
    });
    parts.push(`"${METADATA_KEY}":{${entries.join(',')}}`);
  }
  const datas: Uint8Array[] = [];
  let offset = 0;
  for (const t of ordered) {
    const count = elementCount(t.shape);
    if (count === undefined) throw new SafetensorsError('(serialized)', t.name, 'too many elements');
    const data = encodeTensor(t, count);
    parts.push(
      `${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${offset},${offset + data.byteLength}]}`,
    );
    datas.push(data);
    offset += data.byteLength;
  }
  const json = utf8.encode(`{${parts.join(',')}}`);
  const headerLength = Math.ceil(json.byteLength / 8) * 8;
  const out = new Uint8Array(8 + headerLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.byteLength, 8 + headerLength);
  let at = 8 + headerLength;
  for (const data of datas) {
    out.set(data, at);
    at += data.byteLength;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// One-shot streams

export interface StreamSafetensorsOptions {
  /** Names the stream in errors (default "stream"). */
  file?: string;
  /** The stream's length when known (Content-Length, File.size): checked against the header. */
  totalBytes?: number;
  /** Bytes received so far, and the total when known. */
  onProgress?: (loaded: number, total: number | undefined) => void;
  signal?: AbortSignal;
}

/**
 * Reads a safetensors file from a stream that cannot seek (a fetch body, File.stream()): parses
 * the header from the first bytes, then hands each tensor's bytes to `onTensor` in file order as
 * soon as they have all arrived. Holds at most one tensor's bytes (plus the chunk in flight); the
 * bytes passed to `onTensor` are not reused afterwards. Returns the header.
 */
export async function streamSafetensors(
  stream: ReadableStream<Uint8Array>,
  onTensor: (info: TensorInfo, bytes: Uint8Array) => void | Promise<void>,
  options: StreamSafetensorsOptions = {},
): Promise<SafetensorsHeader> {
  const file = options.file ?? 'stream';
  const total = options.totalBytes;
  const reader = stream.getReader();
  let loaded = 0;
  let chunk: Uint8Array = new Uint8Array(0); // unread part of the last chunk
  let ended = false;

  /** Replaces the (used up) chunk with the next non-empty one; false at the end of the stream. */
  const pull = async (): Promise<boolean> => {
    for (;;) {
      options.signal?.throwIfAborted();
      const { done, value } = await reader.read();
      if (done) {
        ended = true;
        return false;
      }
      if (value.byteLength === 0) continue;
      loaded += value.byteLength;
      options.onProgress?.(loaded, total);
      chunk = value;
      return true;
    }
  };

  /** Fills `target` from the stream, from the unread chunk first. */
  const fill = async (target: Uint8Array, what: () => SafetensorsError): Promise<void> => {
    let n = 0;
    while (n < target.byteLength) {
      if (chunk.byteLength === 0 && !(await pull())) throw what();
      const take = Math.min(chunk.byteLength, target.byteLength - n);
      target.set(chunk.subarray(0, take), n);
      chunk = chunk.subarray(take);
      n += take;
    }
  };

  try {
    const lengthBytes = new Uint8Array(8);
    await fill(
      lengthBytes,
      () => new SafetensorsError(file, undefined, `the stream ended after ${loaded} bytes, inside the header length`),
    );
    const headerLength = readHeaderLength(lengthBytes, file, total ?? Number.POSITIVE_INFINITY);
    const head = new Uint8Array(8 + headerLength);
    head.set(lengthBytes);
    await fill(
      head.subarray(8),
      () => new SafetensorsError(file, undefined, `the stream ended after ${loaded} bytes, inside the header`),
    );
    const header = parseSafetensorsHeader(head, file, total ?? Number.POSITIVE_INFINITY);

    for (const info of header.tensors.values()) {
      const size = info.end - info.begin;
      let bytes: Uint8Array;
      if (chunk.byteLength >= size) {
        // Whole tensor already here: hand over a view, no copy.
        bytes = chunk.subarray(0, size);
        chunk = chunk.subarray(size);
      } else {
        bytes = new Uint8Array(size);
        await fill(
          bytes,
          () =>
            new SafetensorsError(
              file,
              info.name,
              `the stream ended after ${loaded} bytes, before this tensor's last byte (${info.end})`,
            ),
        );
      }
      await onTensor(info, bytes);
    }
    if (chunk.byteLength > 0 || (!ended && (await pull()))) {
      throw new SafetensorsError(
        file,
        undefined,
        'the stream goes on after the last tensor (the file is longer than its header says)',
      );
    }
    return header;
  } catch (error) {
    await reader.cancel().catch(() => undefined);
    throw error;
  } finally {
    reader.releaseLock();
  }
}
