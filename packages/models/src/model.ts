/**
 * A causal language model's frozen weights on the GPU, loaded from a Hugging Face folder with
 * every key and shape asserted against the architecture's parameter table.
 */
import {
  type DType,
  type GpuContext,
  type RowTable,
  ropeInvFreq,
  SplitRows,
  splitRowCounts,
  type Tensor,
  tablePartLimit,
  tensorFromData,
  WebtuneError,
} from '@webtune/core';
import {
  isIgnorableKey,
  type LinearModule,
  type LinearRole,
  type ModelLayout,
  modelLayout,
  type ParamSpec,
  parameterTable,
} from './architecture.js';
import { ConfigError, type ModelConfig, parseModelConfig } from './config.js';
import { ModelFileError } from './errors.js';
import { loadGgufModel } from './gguf-model.js';
import { storedDType, type WeightPrecision } from './precision.js';
import { type ModelWeights, openModelWeights } from './safetensors.js';
import type { ModelSource } from './source.js';
import { transpose2d, uploadTensor, type WeightDType } from './weights.js';

/** A checkpoint that does not match its architecture: missing, unexpected or misshapen tensors. */
export class ModelLoadError extends WebtuneError {
  constructor(
    readonly source: string,
    readonly reason: string,
  ) {
    super(`model in ${source}: ${reason}`);
  }
}

export interface Linear {
  readonly module: LinearModule;
  /** [out, in], f16 or f32. */
  readonly w: Tensor;
  /** [out], f32. */
  readonly bias?: Tensor;
}

export interface Norm {
  /** [d] f32. */
  readonly w: Tensor;
  /** [d] f32 (LayerNorm). */
  readonly b?: Tensor;
}

export interface Layer {
  readonly index: number;
  readonly norm1: Norm;
  readonly norm2: Norm;
  /** Qwen3's per-head norms of q and k, [head_dim] f32. */
  readonly qNorm?: Tensor;
  readonly kNorm?: Tensor;
  readonly linears: Partial<Record<LinearRole, Linear>>;
}

export interface LoadProgress {
  readonly status: 'config' | 'weights' | 'ready';
  /** Bytes of the checkpoint read so far, of `total`. */
  readonly loaded: number;
  readonly total: number;
  readonly tensor?: string;
}

export interface LoadModelOptions {
  /** Precision of the frozen matrices on the GPU (norms and biases are always f32; see
   * precision.ts for what q8_0 and q4_0 quantize). Default f16. */
  precision?: WeightPrecision;
  onProgress?: (p: LoadProgress) => void;
  signal?: AbortSignal;
  /**
   * The most bytes one part of the embedding or the LM head may take; a larger table is split by
   * rows into parts (core's table.ts). Default: the device's maxStorageBufferBindingSize and
   * maxBufferSize, whichever is smaller (tests lower it to split small tables).
   */
  tablePartBytes?: number;
  /**
   * Load this GGUF file of the source (llama.cpp's format; gguf-model.ts) instead of config.json
   * and safetensors. Without `precision`, each tensor keeps its file format where the GPU reads it.
   */
  gguf?: string;
}

export class CausalLM {
  private released = false;

  constructor(
    readonly ctx: GpuContext,
    readonly config: ModelConfig,
    readonly layout: ModelLayout,
    readonly precision: WeightPrecision,
    /** The token embedding [vocab, d], split by rows when it is larger than one binding may be on
     * this device (core's table.ts). */
    readonly embed: RowTable,
    readonly positions: Tensor | undefined,
    readonly layers: readonly Layer[],
    readonly finalNorm: Norm,
    /** The LM head [vocab, d]: the embedding itself when tied; split like it. */
    readonly lmHead: RowTable,
    /** RoPE inverse frequencies [head_dim/2], f32 (Llama family). */
    readonly ropeInvFreq: Tensor | undefined,
    readonly ropeAttentionScaling: number,
    private readonly owned: readonly Tensor[],
    /** Where it came from, for messages. */
    readonly description: string,
    /** The most bytes one part of a split embedding or LM head takes (loadModel's tablePartBytes,
     * or the device's limit): what a memory estimate for this model must assume. */
    readonly tablePartBytes = Number.POSITIVE_INFINITY,
    /** The Hugging Face model these weights are, when the file names it (GGUF metadata): what an
     * adapter trained on them records as base_model_name_or_path. */
    readonly baseModelId?: string,
    /** The dtype of each tensor stored otherwise than `precision` implies (a GGUF base keeps each
     * tensor's format), by Hugging Face key; a memory estimate for this model takes them. */
    readonly storedDTypes?: ReadonlyMap<string, DType>,
    /** ropeInvFreq's values on the host: the attention backward takes them in its uniforms. */
    readonly ropeInvFreqValues?: Float32Array,
  ) {}

  /** Bytes of the GPU buffers the weights occupy. */
  get bytes(): number {
    return this.owned.reduce((n, t) => n + t.byteLength, 0);
  }

  get disposed(): boolean {
    return this.released;
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    for (const t of this.owned) t.dispose();
  }
}

/** Reads and validates config.json from a source. */
export async function loadModelConfig(source: ModelSource): Promise<ModelConfig> {
  const text = await source.readText('config.json');
  if (text === undefined)
    throw new ModelFileError(source.description, 'config.json', 'not found (is this a Hugging Face model folder?)');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`${source.description}/config.json`, undefined, `is not valid JSON: ${(e as Error).message}`);
  }
  return parseModelConfig(json, `${source.description}/config.json`);
}

/** Maps each canonical key to the name the checkpoint uses (GPT-2 files often drop 'transformer.'). */
function resolveKeys(
  config: ModelConfig,
  weights: ModelWeights,
  specs: readonly ParamSpec[],
  where: string,
): Map<string, string> {
  const found = new Map<string, string>();
  const missing: string[] = [];
  for (const spec of specs) {
    const alt = config.family === 'gpt2' ? spec.key.replace(/^transformer\./, '') : undefined;
    if (weights.has(spec.key)) found.set(spec.key, spec.key);
    else if (alt && weights.has(alt)) found.set(spec.key, alt);
    else missing.push(spec.key);
  }
  const used = new Set(found.values());
  const unexpected = weights
    .names()
    .filter((n) => !used.has(n) && !isIgnorableKey(config, n) && !(config.tieWordEmbeddings && n === 'lm_head.weight'));
  const problems: string[] = [];
  if (missing.length > 0)
    problems.push(
      `missing tensors: ${missing.slice(0, 10).join(', ')}${missing.length > 10 ? ` and ${missing.length - 10} more` : ''}`,
    );
  if (unexpected.length > 0) {
    problems.push(
      `unexpected tensors for ${config.architecture}: ${unexpected.slice(0, 10).join(', ')}${unexpected.length > 10 ? ` and ${unexpected.length - 10} more` : ''}`,
    );
  }
  if (problems.length > 0) throw new ModelLoadError(where, problems.join('; '));
  return found;
}

/**
 * Loads config.json and the safetensors weights (single file or sharded) from `source` onto the
 * GPU. Tensors are streamed one at a time; nothing but the current chunk is held in memory.
 */
export async function loadModel(
  ctx: GpuContext,
  source: ModelSource,
  options: LoadModelOptions = {},
): Promise<CausalLM> {
  if (options.gguf !== undefined) return loadGgufModel(ctx, source, options.gguf, options);
  const precision = options.precision ?? 'f16';
  const where = source.description;
  options.onProgress?.({ status: 'config', loaded: 0, total: 0 });
  const config = await loadModelConfig(source);
  const layout = modelLayout(config);
  const specs = parameterTable(config);
  const weights = await openModelWeights(source);
  const names = resolveKeys(config, weights, specs, where);
  const infos = await weights.infos();

  let total = 0;
  for (const spec of specs) {
    const info = infos.get(names.get(spec.key) as string);
    if (!info) throw new ModelLoadError(where, `no header entry for ${spec.key}`);
    if (info.shape.length !== spec.shape.length || info.shape.some((d, i) => d !== spec.shape[i])) {
      throw new ModelLoadError(
        where,
        `${spec.key} has shape [${info.shape.join(', ')}], ${config.architecture} with this config.json needs [${spec.shape.join(', ')}]`,
      );
    }
    total += info.end - info.begin;
  }

  const tensors = new Map<string, Tensor>();
  const tables = new Map<string, SplitRows>();
  const owned: Tensor[] = [];
  let loaded = 0;
  try {
    for (const spec of specs) {
      const name = names.get(spec.key) as string;
      const info = infos.get(name);
      const size = info ? info.end - info.begin : 0;
      const [rows, cols] = spec.shape as [number, number];
      const dtype = storedDType(spec, precision) as WeightDType;
      const upload = (extra: { label: string; rows?: { start: number; count: number } }, done: number) =>
        uploadTensor(ctx, weights, name, {
          dtype,
          signal: options.signal,
          ...extra,
          ...(spec.transpose
            ? { shape: [cols, rows], transform: (d: Float32Array) => transpose2d(d, rows, cols) }
            : {}),
          onProgress: (l) =>
            options.onProgress?.({ status: 'weights', loaded: loaded + done + l, total, tensor: spec.key }),
        });
      // The embedding and LM head (vocabulary × d) may exceed one binding: split them by rows.
      const table = spec.key === layout.embed || spec.key === layout.lmHead;
      const limit = options.tablePartBytes ?? tablePartLimit(ctx.limits);
      const counts = table ? splitRowCounts(rows, cols, dtype, limit) : [rows];
      if (counts.length === 1) {
        const t = await upload({ label: spec.key }, 0);
        owned.push(t);
        tensors.set(spec.key, t);
      } else {
        const parts: Tensor[] = [];
        let start = 0;
        for (const count of counts) {
          const t = await upload(
            { label: `${spec.key}[${start}:${start + count}]`, rows: { start, count } },
            (size * start) / rows,
          );
          owned.push(t);
          parts.push(t);
          start += count;
        }
        tables.set(spec.key, new SplitRows(parts, spec.key));
      }
      loaded += size;
    }
    options.onProgress?.({ status: 'ready', loaded: total, total });
    return assembleModel(ctx, {
      config,
      layout,
      precision,
      tensors,
      tables,
      owned,
      description: where,
      tablePartBytes: options.tablePartBytes ?? tablePartLimit(ctx.limits),
    });
  } catch (e) {
    for (const t of owned) t.dispose();
    throw e;
  }
}

/** What a loader has uploaded, for assembleModel. */
export interface UploadedWeights {
  readonly config: ModelConfig;
  readonly layout: ModelLayout;
  readonly precision: WeightPrecision;
  /** Every parameter by its Hugging Face key, but the split tables. */
  readonly tensors: ReadonlyMap<string, Tensor>;
  /** The embedding or LM head split by rows, by key. */
  readonly tables: ReadonlyMap<string, SplitRows>;
  /** Every GPU tensor made so far (released on failure, owned by the model otherwise). */
  readonly owned: Tensor[];
  readonly description: string;
  readonly tablePartBytes: number;
  /** RoPE's inverse frequencies when the file gives them (GGUF's rope_freqs factors). */
  readonly ropeInvFreq?: Float32Array;
  /** The Hub model these weights are, when the file says (GGUF metadata). */
  readonly baseModelId?: string;
  /** Any tensor stored other than `precision` says (a GGUF file keeps each as it is). */
  readonly storedDTypes?: ReadonlyMap<string, DType>;
}

/** Builds the CausalLM over uploaded weights (the layers, RoPE's frequencies). */
export function assembleModel(ctx: GpuContext, w: UploadedWeights): CausalLM {
  const { config, layout, tensors, tables, owned } = w;
  const get = (key: string) => {
    const t = tensors.get(key);
    if (!t) throw new ModelLoadError(w.description, `no tensor for ${key}`);
    return t;
  };
  const table = (key: string): RowTable => tables.get(key) ?? get(key);
  const layers: Layer[] = layout.layers.map((l, index) => {
    const linears: Partial<Record<LinearRole, Linear>> = {};
    for (const m of l.linears) {
      linears[m.role] = { module: m, w: get(`${m.name}.weight`), bias: m.bias ? get(`${m.name}.bias`) : undefined };
    }
    return {
      index,
      norm1: { w: get(l.norm1.w), b: l.norm1.b ? get(l.norm1.b) : undefined },
      norm2: { w: get(l.norm2.w), b: l.norm2.b ? get(l.norm2.b) : undefined },
      qNorm: l.qNorm ? get(l.qNorm) : undefined,
      kNorm: l.kNorm ? get(l.kNorm) : undefined,
      linears,
    };
  });
  let invFreq: Tensor | undefined;
  let invFreqValues: Float32Array | undefined;
  let scaling = 1;
  if (config.rope) {
    const r = ropeInvFreq({ headDim: config.headDim, ropeTheta: config.rope.theta, ropeScaling: config.rope.scaling });
    invFreqValues = Float32Array.from(w.ropeInvFreq ?? r.invFreq);
    invFreq = tensorFromData(ctx, invFreqValues, [config.headDim / 2], 'f32', 'rope.inv_freq');
    owned.push(invFreq);
    scaling = w.ropeInvFreq ? 1 : r.attentionScaling;
  }
  return new CausalLM(
    ctx,
    config,
    layout,
    w.precision,
    table(layout.embed),
    layout.positions ? get(layout.positions) : undefined,
    layers,
    { w: get(layout.finalNorm.w), b: layout.finalNorm.b ? get(layout.finalNorm.b) : undefined },
    layout.lmHead ? table(layout.lmHead) : table(layout.embed),
    invFreq,
    scaling,
    owned,
    w.description,
    w.tablePartBytes,
    w.baseModelId,
    w.storedDTypes,
    invFreqValues,
  );
}
