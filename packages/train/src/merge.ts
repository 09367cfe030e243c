/**
 * Merging a LoRA adapter into its base model: W' = W0 + s·B·A for every adapted module, written
 * as a full Hugging Face model folder that transformers and webtune load like the original.
 *
 *   nn.Linear (Llama, Qwen):  W0 stored [out, in]:  W'[o, i] = W0[o, i] + s·Σ_k B[o, k]·A[k, i]
 *   Conv1D (GPT-2):           W0 stored [in, out]:  W'[i, o] = W0[i, o] + s·Σ_k B[o, k]·A[k, i]
 *                             (the delta is transposed, (B·A)ᵀ·s, as PEFT's fan_in_fan_out merge)
 *
 * with s = alpha / r (alpha / √r with rsLoRA), A [r, in] and B [out, r].
 *
 * Arithmetic: on the CPU in float64 — W0 decoded exactly from F32/F16/BF16, the r-term sum and the
 * addition in double precision — then rounded once to the checkpoint's dtype (round to nearest
 * even). For F16 and BF16 the double is first rounded to f32 *to odd*, which makes the following
 * round-to-nearest-even to 11 or 8 bits the correctly rounded result of the double (f32 carries
 * more than two extra bits). PEFT instead rounds the delta to the weight's dtype and then the sum
 * again; for F32 checkpoints both agree to an ulp.
 *
 * Output: every safetensors file of the checkpoint is written under the same name with the same
 * header bytes (keys, dtypes, shapes, offsets and __metadata__ exactly as in the base), the
 * unadapted tensors copied byte for byte and the adapted ones replaced by their merged values. A
 * sharded checkpoint therefore comes out sharded the same way, with its index copied unchanged
 * (the sizes do not change). config.json, generation_config.json, the tokenizer files and licence
 * files are copied as they are. The model is streamed: tensors are read and written in slices of
 * `chunkBytes` (8 MiB by default); at no point is more than one slice (plus the adapter) in memory.
 */
import { WebtuneError } from '@webtune/core';
import {
  DTYPE_BYTES,
  decodeToFloat32,
  f32BitsToF16Bits,
  isFloatDType,
  linearModules,
  loadModelConfig,
  type ModelConfig,
  type ModelSource,
  openModelWeights,
  type SafetensorsFile,
  type TensorInfo,
} from '@webtune/models';
import { type AdaptedModule, AdapterMismatchError, type LoraWeights, type ResolvedLora } from './lora/index.js';

/** What mergeAdapter needs of an adapter: an ImportedAdapter is one. */
export interface MergeableAdapter {
  readonly resolved: ResolvedLora;
  /** A [r, in] and B [out, r] by module name. */
  readonly weights: ReadonlyMap<string, LoraWeights>;
}

/** Where the merged folder goes: a directory (directorySink), memory (memorySink), OPFS ... */
export interface MergeSink {
  /** Writes the file `name` from `chunks`, in order. Called once per file, one file at a time. */
  writeFile(name: string, chunks: AsyncIterable<Uint8Array>): Promise<void>;
}

export interface MergeProgress {
  /** The file being written. */
  readonly file: string;
  /** Checkpoint bytes written so far, of `total`. */
  readonly written: number;
  readonly total: number;
}

export interface MergeOptions {
  /** Bytes of a tensor read and written per slice (default 8 MiB). */
  readonly chunkBytes?: number;
  readonly onProgress?: (p: MergeProgress) => void;
  readonly signal?: AbortSignal;
}

export interface MergeResult {
  /** Every file written, in order. */
  readonly files: readonly string[];
  /** Checkpoint keys whose values were merged. */
  readonly merged: readonly string[];
  /** Bytes of the safetensors files written. */
  readonly weightBytes: number;
}

/** Small files of a model folder copied as they are, when present. */
export const MODEL_SIDE_FILES = [
  'config.json',
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'chat_template.jinja',
  'chat_template.json',
  'vocab.json',
  'merges.txt',
  'tokenizer.model',
  'LICENSE',
  'LICENSE.txt',
  'LICENSE.md',
] as const;

const DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024;

/** The checkpoint key holding `module`'s weight (GPT-2 files may drop 'transformer.'). */
function weightKey(config: ModelConfig, has: (key: string) => boolean, module: string): string | undefined {
  const key = `${module}.weight`;
  if (has(key)) return key;
  if (config.family === 'gpt2') {
    const alt = key.replace(/^transformer\./, '');
    if (has(alt)) return alt;
  }
  return undefined;
}

interface Planned {
  readonly module: AdaptedModule;
  readonly a: Float32Array;
  readonly b: Float32Array;
}

/** Checks the adapter against the base model and maps checkpoint keys to modules. */
function plan(
  config: ModelConfig,
  adapter: MergeableAdapter,
  has: (key: string) => boolean,
  info: (key: string) => TensorInfo,
): Map<string, Planned> {
  const linears = new Map(linearModules(config).map((m) => [m.name, m]));
  const out = new Map<string, Planned>();
  for (const m of adapter.resolved.modules) {
    const base = linears.get(m.name);
    if (!base)
      throw new AdapterMismatchError(
        m.name,
        `the base model (${config.architecture}) has no linear module of this name`,
      );
    if (base.inFeatures !== m.inFeatures || base.outFeatures !== m.outFeatures) {
      throw new AdapterMismatchError(
        m.name,
        `the adapter was made for [out ${m.outFeatures}, in ${m.inFeatures}], the base model's module is [out ${base.outFeatures}, in ${base.inFeatures}]`,
      );
    }
    const w = adapter.weights.get(m.name);
    if (!w) throw new AdapterMismatchError(m.name, 'the adapter has no A/B weights for this module');
    if (w.a.length !== m.r * m.inFeatures || w.b.length !== m.outFeatures * m.r) {
      throw new AdapterMismatchError(
        m.name,
        `lora_A holds ${w.a.length} values and lora_B ${w.b.length}; [${m.aShape.join(', ')}] and [${m.bShape.join(', ')}] need ${m.r * m.inFeatures} and ${m.outFeatures * m.r}`,
      );
    }
    const key = weightKey(config, has, m.name);
    if (key === undefined) throw new AdapterMismatchError(m.name, `the checkpoint has no ${m.name}.weight`);
    const t = info(key);
    const expected = m.kind === 'conv1d' ? [m.inFeatures, m.outFeatures] : [m.outFeatures, m.inFeatures];
    if (t.shape.length !== 2 || t.shape[0] !== expected[0] || t.shape[1] !== expected[1]) {
      throw new AdapterMismatchError(
        m.name,
        `${key} is stored as [${t.shape.join(', ')}], a ${m.kind === 'conv1d' ? 'Conv1D [in, out]' : 'Linear [out, in]'} of this adapter needs [${expected.join(', ')}]`,
        key,
        expected,
        t.shape,
      );
    }
    if (!isFloatDType(t.dtype)) {
      throw new AdapterMismatchError(m.name, `${key} is ${t.dtype}; only F32, F16 and BF16 weights can be merged`, key);
    }
    out.set(key, { module: m, a: w.a, b: w.b });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Rounding a double once to the stored dtype

const scratch32 = new Float32Array(1);
const scratchBits = new Uint32Array(scratch32.buffer);

/** f32 bits of x rounded to odd: exact when representable, else the neighbour with an odd last bit. */
export function roundToOddF32Bits(x: number): number {
  scratch32[0] = x;
  let bits = scratchBits[0] as number;
  const f = scratch32[0] as number;
  if (f === x || Number.isNaN(x)) return bits;
  if (Math.abs(f) > Math.abs(x)) bits -= 1; // one ulp toward zero (sign-magnitude bits)
  return (bits | 1) >>> 0;
}

/** bfloat16 bits of x, round to nearest even from the double (NaN -> 0x7fc0). */
export function roundToBf16Bits(x: number): number {
  if (Number.isNaN(x)) return 0x7fc0;
  const bits = roundToOddF32Bits(x);
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** IEEE half bits of x, round to nearest even from the double. */
export function roundToF16Bits(x: number): number {
  return f32BitsToF16Bits(roundToOddF32Bits(x));
}

/** Writes `values` (doubles) as `dtype` bytes. */
function encode(values: Float64Array, dtype: 'F32' | 'F16' | 'BF16'): Uint8Array {
  if (dtype === 'F32') return new Uint8Array(Float32Array.from(values).buffer);
  const out = new Uint16Array(values.length);
  const round = dtype === 'F16' ? roundToF16Bits : roundToBf16Bits;
  for (let i = 0; i < values.length; i++) out[i] = round(values[i] as number);
  return new Uint8Array(out.buffer);
}

/**
 * Rows [r0, r1) of the merged weight, as doubles, from the same rows of the stored weight.
 * Linear: a row is an output o; Conv1D: a row is an input i.
 */
export function mergeRows(
  module: Pick<AdaptedModule, 'kind' | 'inFeatures' | 'outFeatures' | 'r' | 'scale'>,
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  w0: ArrayLike<number>,
  r0: number,
  r1: number,
): Float64Array {
  const { inFeatures: nIn, outFeatures: nOut, r, scale: s } = module;
  const conv = module.kind === 'conv1d';
  const cols = conv ? nOut : nIn;
  const out = new Float64Array((r1 - r0) * cols);
  const term = new Float64Array(r);
  for (let row = r0; row < r1; row++) {
    const base = (row - r0) * cols;
    if (conv) {
      // i = row: W'[i, o] = W0[i, o] + s·Σ_k B[o, k]·A[k, i]
      for (let k = 0; k < r; k++) term[k] = a[k * nIn + row] as number;
      for (let o = 0; o < nOut; o++) {
        let sum = 0;
        for (let k = 0; k < r; k++) sum += (b[o * r + k] as number) * (term[k] as number);
        out[base + o] = (w0[base + o] as number) + s * sum;
      }
    } else {
      // o = row: W'[o, i] = W0[o, i] + s·Σ_k B[o, k]·A[k, i]
      for (let k = 0; k < r; k++) term[k] = b[row * r + k] as number;
      for (let i = 0; i < nIn; i++) {
        let sum = 0;
        for (let k = 0; k < r; k++) sum += (term[k] as number) * (a[k * nIn + i] as number);
        out[base + i] = (w0[base + i] as number) + s * sum;
      }
    }
  }
  return out;
}

async function* tensorChunks(
  file: SafetensorsFile,
  t: TensorInfo,
  merge: Planned | undefined,
  chunkBytes: number,
  signal: AbortSignal | undefined,
): AsyncGenerator<Uint8Array> {
  const size = t.end - t.begin;
  if (!merge) {
    for (let at = 0; at < size; at += chunkBytes) {
      signal?.throwIfAborted();
      yield await file.readBytes(t.name, at, Math.min(size, at + chunkBytes));
    }
    return;
  }
  const dtype = t.dtype as 'F32' | 'F16' | 'BF16';
  const [rows, cols] = t.shape as [number, number];
  const rowBytes = cols * DTYPE_BYTES[dtype];
  const step = Math.max(1, Math.floor(chunkBytes / rowBytes));
  for (let r0 = 0; r0 < rows; r0 += step) {
    signal?.throwIfAborted();
    const r1 = Math.min(rows, r0 + step);
    const w0 = decodeToFloat32(dtype, await file.readBytes(t.name, r0 * rowBytes, r1 * rowBytes));
    yield encode(mergeRows(merge.module, merge.a, merge.b, w0, r0, r1), dtype);
  }
}

/**
 * Writes the base model with the adapter merged into `out`: the checkpoint's safetensors files
 * (same names, keys, shapes, dtypes; see the module comment), the index of a sharded checkpoint,
 * and the side files (MODEL_SIDE_FILES) that exist. Throws AdapterMismatchError when the adapter
 * does not fit the base model (a module it lacks, another shape, a non-float weight).
 */
export async function mergeAdapter(
  base: ModelSource,
  adapter: MergeableAdapter,
  out: MergeSink,
  options: MergeOptions = {},
): Promise<MergeResult> {
  const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes < 1)
    throw new WebtuneError(`mergeAdapter: chunkBytes must be a positive integer, got ${chunkBytes}`);
  const config = await loadModelConfig(base);
  const weights = await openModelWeights(base);
  const infos = await weights.infos();
  const merges = plan(
    config,
    adapter,
    (key) => weights.has(key),
    (key) => infos.get(key) as TensorInfo,
  );
  const files: string[] = [];
  const shards = weights.files();
  // One tensor per shard opens it (ModelWeights opens shards by the tensors they hold).
  const firstOf = new Map<string, string>();
  for (const [tensor, shard] of weights.weightMap) if (!firstOf.has(shard)) firstOf.set(shard, tensor);
  const opened = await Promise.all(shards.map((shard) => weights.fileOf(firstOf.get(shard) as string)));
  const total = opened.reduce((n, f) => n + f.header.fileSize, 0);
  let written = 0;
  for (const file of opened) {
    options.signal?.throwIfAborted();
    const header = await base.readRange(file.name, 0, file.header.dataStart);
    const report = (n: number) => {
      written += n;
      options.onProgress?.({ file: file.name, written, total });
    };
    async function* chunks(): AsyncGenerator<Uint8Array> {
      yield header;
      report(header.byteLength);
      for (const t of file.tensors.values()) {
        for await (const c of tensorChunks(file, t, merges.get(t.name), chunkBytes, options.signal)) {
          yield c;
          report(c.byteLength);
        }
      }
    }
    await out.writeFile(file.name, chunks());
    files.push(file.name);
  }
  const side = [...(shards.includes(weights.listing) ? [] : [weights.listing]), ...MODEL_SIDE_FILES];
  for (const name of side) {
    options.signal?.throwIfAborted();
    const size = await base.size(name);
    if (size === undefined) continue;
    const bytes = await base.readRange(name, 0, size);
    await out.writeFile(
      name,
      (async function* () {
        yield bytes;
      })(),
    );
    files.push(name);
  }
  return { files, merged: [...merges.keys()], weightBytes: total };
}

// ---------------------------------------------------------------------------------------------
// Sinks

/** Collects the files in memory (tests, small models, a download built in the page). */
export function memorySink(): MergeSink & { readonly files: Map<string, Uint8Array> } {
  const files = new Map<string, Uint8Array>();
  return {
    files,
    async writeFile(name, chunks) {
      const parts: Uint8Array[] = [];
      let n = 0;
      for await (const c of chunks) {
        parts.push(c);
        n += c.byteLength;
      }
      const all = new Uint8Array(n);
      let at = 0;
      for (const p of parts) {
        all.set(p, at);
        at += p.byteLength;
      }
      files.set(name, all);
    },
  };
}

interface NodeFsWrite {
  mkdir(path: string, options: { recursive: boolean }): Promise<unknown>;
  open(path: string, flags: string): Promise<{ write(data: Uint8Array): Promise<unknown>; close(): Promise<void> }>;
}

/** Writes the files into a folder (Node only; made if missing). Files are written whole, in order. */
export function directorySink(path: string): MergeSink {
  const name = 'node:fs/promises';
  const fs = import(/* @vite-ignore */ name) as Promise<NodeFsWrite>;
  let made: Promise<unknown> | undefined;
  return {
    async writeFile(file, chunks) {
      if (file.includes('..') || file.startsWith('/') || file.includes('\\'))
        throw new WebtuneError(`mergeAdapter: refusing to write ${JSON.stringify(file)} outside ${path}`);
      const f = await fs;
      made ??= f.mkdir(path, { recursive: true });
      await made;
      const dir = file.lastIndexOf('/');
      if (dir > 0) await f.mkdir(`${path}/${file.slice(0, dir)}`, { recursive: true });
      const handle = await f.open(`${path}/${file}`, 'w');
      try {
        for await (const c of chunks) await handle.write(c);
      } finally {
        await handle.close();
      }
    },
  };
}
