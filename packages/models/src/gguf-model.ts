/**
 * A GGUF file (llama.cpp, Ollama, LM Studio) as a base model: its metadata becomes a validated
 * ModelConfig (the same one config.json gives), its tensors are matched to the architecture's
 * parameter table under their Hugging Face names, and then uploaded as loadModel uploads
 * safetensors. Everything is checked before any GPU memory is allocated: the architecture, every
 * tensor's presence, shape and type, and the metadata against the tensors.
 *
 * Supported: general.architecture llama (Llama, TinyLlama, SmolLM, Llama 3 with rope_freqs),
 * qwen2, qwen3 and gpt2; tensors in F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K.
 *
 * What llama.cpp's converter changed, undone here:
 *   - names: token_embd, blk.N.attn_q, ffn_gate, ... (HF_NAMES below);
 *   - Llama's q and k projections have their rows permuted per head (rotary pairs interleaved:
 *     GGUF row h·hd + 2i + j holds HF row h·hd + j·hd/2 + i); the rows are put back in HF order
 *     (whole rows, so quantized blocks move intact). Qwen2/3 and GPT-2 are not permuted;
 *   - GPT-2's Conv1D weights are stored [out, in] (transposed from HF's [in, out]), which is the
 *     layout the engine keeps: no transpose on load;
 *   - Llama 3's RoPE scaling is a rope_freqs tensor of per-frequency divisors, applied to the
 *     inverse frequencies as llama.cpp does.
 *
 * Precision: by default each linear weight keeps its file format when the GPU kernels read it
 * (Q8_0 -> q8_0, Q4_0 -> q4_0, F16/BF16/F32 -> f16) and a k-quant is dequantized and stored as
 * q8_0; embeddings and the LM head are f16, as at every precision (precision.ts). An explicit
 * precision converts every tensor to it (requantizing a block format from its exact values).
 */
import {
  createTensor,
  type DType,
  fromGgmlBlocks,
  type GpuContext,
  ropeInvFreq,
  SplitRows,
  splitRowCounts,
  type Tensor,
  tablePartLimit,
} from '@webtune/core';
import { modelLayout, type ParamSpec, parameterTable } from './architecture.js';
import { type ModelConfig, parseModelConfig } from './config.js';
import { decodeGgml, GGUF_SUPPORTED_TYPES, type GgufSupportedType, isGgufSupportedType } from './ggml.js';
import { GgufError, type GgufHeader, type GgufTensorInfo, type GgufValue, ggufValue, readGgufHeader } from './gguf.js';
import { assembleModel, type CausalLM, type LoadModelOptions } from './model.js';
import { storedDType, type WeightPrecision } from './precision.js';
import type { ModelSource } from './source.js';
import { valueWriter, type WeightDType, writeQuantizedBlocks } from './weights.js';

export const GGUF_ARCHITECTURES = ['llama', 'qwen2', 'qwen3', 'gpt2'] as const;
type GgufArch = (typeof GGUF_ARCHITECTURES)[number];

/** A GGUF model checked against its architecture, before any upload. */
export interface GgufModel {
  readonly header: GgufHeader;
  readonly config: ModelConfig;
  /** GGUF tensor name of every parameter, by Hugging Face key. */
  readonly names: ReadonlyMap<string, string>;
  /** Parameters whose rows llama.cpp permuted (Llama's q, k), with their head count. */
  readonly permuted: ReadonlyMap<string, number>;
  /** Llama 3's rope_freqs divisors, applied to RoPE's inverse frequencies. */
  readonly ropeInvFreq?: Float32Array;
  /** The Hub model the file was converted from, when the metadata says. */
  readonly baseModelId?: string;
}

/** HF key (after the layer prefix) -> GGUF name (after blk.N.), per family. */
const LLAMA_LAYER: Record<string, string> = {
  'input_layernorm.weight': 'attn_norm.weight',
  'post_attention_layernorm.weight': 'ffn_norm.weight',
  'self_attn.q_proj.weight': 'attn_q.weight',
  'self_attn.q_proj.bias': 'attn_q.bias',
  'self_attn.k_proj.weight': 'attn_k.weight',
  'self_attn.k_proj.bias': 'attn_k.bias',
  'self_attn.v_proj.weight': 'attn_v.weight',
  'self_attn.v_proj.bias': 'attn_v.bias',
  'self_attn.o_proj.weight': 'attn_output.weight',
  'self_attn.o_proj.bias': 'attn_output.bias',
  'self_attn.q_norm.weight': 'attn_q_norm.weight',
  'self_attn.k_norm.weight': 'attn_k_norm.weight',
  'mlp.gate_proj.weight': 'ffn_gate.weight',
  'mlp.gate_proj.bias': 'ffn_gate.bias',
  'mlp.up_proj.weight': 'ffn_up.weight',
  'mlp.up_proj.bias': 'ffn_up.bias',
  'mlp.down_proj.weight': 'ffn_down.weight',
  'mlp.down_proj.bias': 'ffn_down.bias',
};
const GPT2_LAYER: Record<string, string> = {
  'ln_1.weight': 'attn_norm.weight',
  'ln_1.bias': 'attn_norm.bias',
  'attn.c_attn.weight': 'attn_qkv.weight',
  'attn.c_attn.bias': 'attn_qkv.bias',
  'attn.c_proj.weight': 'attn_output.weight',
  'attn.c_proj.bias': 'attn_output.bias',
  'ln_2.weight': 'ffn_norm.weight',
  'ln_2.bias': 'ffn_norm.bias',
  'mlp.c_fc.weight': 'ffn_up.weight',
  'mlp.c_fc.bias': 'ffn_up.bias',
  'mlp.c_proj.weight': 'ffn_down.weight',
  'mlp.c_proj.bias': 'ffn_down.bias',
};
const GLOBAL: Record<string, string> = {
  'model.embed_tokens.weight': 'token_embd.weight',
  'model.norm.weight': 'output_norm.weight',
  'transformer.wte.weight': 'token_embd.weight',
  'transformer.wpe.weight': 'position_embd.weight',
  'transformer.ln_f.weight': 'output_norm.weight',
  'transformer.ln_f.bias': 'output_norm.bias',
  'lm_head.weight': 'output.weight',
};

function ggufName(key: string): string | undefined {
  if (key in GLOBAL) return GLOBAL[key];
  const m = /^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)$/.exec(key);
  if (!m) return undefined;
  const rest = (key.startsWith('transformer.') ? GPT2_LAYER : LLAMA_LAYER)[m[2] as string];
  return rest === undefined ? undefined : `blk.${m[1]}.${rest}`;
}

function isArch(v: string): v is GgufArch {
  return (GGUF_ARCHITECTURES as readonly string[]).includes(v);
}

/** A Hub id ("org/name") from a huggingface.co URL. */
function hubId(url: GgufValue | undefined): string | undefined {
  if (typeof url !== 'string') return undefined;
  const m = /^https?:\/\/(?:www\.)?huggingface\.co\/([\w.-]+\/[\w.-]+?)\/?$/.exec(url.trim());
  return m?.[1];
}

/**
 * The Hugging Face model a GGUF file was converted from: general.source.repo_url,
 * general.source.url or general.repo_url when one of them is a huggingface.co URL, or the
 * older general.source.huggingface.repository. Not general.base_model.*: that is the model the
 * converted one was itself fine-tuned from (an Instruct model's base), whose weights differ.
 */
export function ggufBaseModelId(h: GgufHeader): string | undefined {
  for (const key of ['general.source.repo_url', 'general.source.url', 'general.repo_url']) {
    const id = hubId(h.metadata.get(key));
    if (id) return id;
  }
  const repo = h.metadata.get('general.source.huggingface.repository');
  return typeof repo === 'string' && /^[\w.-]+\/[\w.-]+$/.test(repo) ? repo : undefined;
}

/** The config.json that describes the file's model, from its metadata and tensor shapes. */
function configJson(h: GgufHeader, arch: GgufArch): Record<string, unknown> {
  const num = (key: string, fallback?: number) => ggufValue(h, `${arch}.${key}`, 'number', fallback);
  const embd = h.tensors.get('token_embd.weight');
  if (embd?.shape.length !== 2)
    throw new GgufError(h.file, 'token_embd.weight', 'the token embedding is missing or not 2-D');
  const [vocab, d] = embd.shape as [number, number];
  const hidden = num('embedding_length');
  if (hidden !== d)
    throw new GgufError(h.file, `${arch}.embedding_length`, `${hidden} does not match token_embd.weight's width ${d}`);
  const tokens = h.metadata.get('tokenizer.ggml.tokens');
  if (Array.isArray(tokens) && tokens.length !== vocab)
    throw new GgufError(
      h.file,
      'tokenizer.ggml.tokens',
      `${tokens.length} tokens, but token_embd.weight has ${vocab} rows`,
    );
  const layers = num('block_count');
  const heads = num('attention.head_count');
  const ffn = num('feed_forward_length');
  const context = num('context_length');
  const tied = !h.tensors.has('output.weight');
  const bos = h.metadata.get('tokenizer.ggml.bos_token_id');
  const eos = h.metadata.get('tokenizer.ggml.eos_token_id');
  const ids = {
    ...(typeof bos === 'number' ? { bos_token_id: bos } : {}),
    ...(typeof eos === 'number' ? { eos_token_id: eos } : {}),
  };
  const scaling = h.metadata.get(`${arch}.rope.scaling.type`);
  if (scaling !== undefined && scaling !== 'none')
    throw new GgufError(
      h.file,
      `${arch}.rope.scaling.type`,
      `"${String(scaling)}" RoPE scaling is not supported (none, or Llama 3's rope_freqs)`,
    );
  if (arch === 'gpt2') {
    return {
      architectures: ['GPT2LMHeadModel'],
      model_type: 'gpt2',
      vocab_size: vocab,
      n_embd: d,
      n_layer: layers,
      n_head: heads,
      n_inner: ffn,
      n_positions: context,
      layer_norm_epsilon: num('attention.layer_norm_epsilon', 1e-5),
      activation_function: 'gelu_new',
      tie_word_embeddings: tied,
      ...ids,
    };
  }
  const headDim = num('attention.key_length', d / heads);
  const ropeDims = num('rope.dimension_count', headDim);
  if (ropeDims !== headDim)
    throw new GgufError(
      h.file,
      `${arch}.rope.dimension_count`,
      `partial rotary (${ropeDims} of ${headDim} dimensions) is not supported`,
    );
  return {
    architectures: [{ llama: 'LlamaForCausalLM', qwen2: 'Qwen2ForCausalLM', qwen3: 'Qwen3ForCausalLM' }[arch]],
    model_type: arch,
    vocab_size: vocab,
    hidden_size: d,
    intermediate_size: ffn,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: num('attention.head_count_kv', heads),
    head_dim: headDim,
    max_position_embeddings: context,
    rms_norm_eps: num('attention.layer_norm_rms_epsilon', 1e-6),
    rope_theta: num('rope.freq_base', 10000),
    tie_word_embeddings: tied,
    attention_bias: arch === 'llama' && h.tensors.has('blk.0.attn_q.bias'),
    ...ids,
  };
}

/** The GPU shape of a parameter ([out, in] for every linear weight). */
function gpuShape(spec: ParamSpec): number[] {
  return spec.transpose ? [spec.shape[1] as number, spec.shape[0] as number] : [...spec.shape];
}

/**
 * Reads and checks a GGUF file's header against its architecture: every parameter present with
 * the right shape and a supported type, nothing unexpected. No GPU work.
 */
export async function openGgufModel(source: ModelSource, file: string): Promise<GgufModel> {
  const h = await readGgufHeader(source, file);
  const arch = ggufValue(h, 'general.architecture', 'string');
  if (!isArch(arch))
    throw new GgufError(
      file,
      'general.architecture',
      `"${arch}" is not supported; supported: ${GGUF_ARCHITECTURES.join(', ')}`,
    );
  const config = parseModelConfig(configJson(h, arch), `${file} (GGUF metadata)`);
  const names = new Map<string, string>();
  const permuted = new Map<string, number>();
  const problems: string[] = [];
  for (const spec of parameterTable(config)) {
    const name = ggufName(spec.key);
    const info = name ? h.tensors.get(name) : undefined;
    if (!name || !info) {
      problems.push(`missing ${name ?? spec.key} (${spec.key})`);
      continue;
    }
    const want = gpuShape(spec);
    if (info.shape.length !== want.length || info.shape.some((n, i) => n !== want[i]))
      throw new GgufError(
        file,
        name,
        `shape [${info.shape.join(', ')}], but ${config.architecture} with this metadata needs [${want.join(', ')}] for ${spec.key}`,
      );
    if (!isGgufSupportedType(info.type))
      throw new GgufError(
        file,
        name,
        `type ${info.type} is not supported; supported: ${GGUF_SUPPORTED_TYPES.join(', ')}`,
      );
    names.set(spec.key, name);
    if (arch === 'llama' && /\.self_attn\.[qk]_proj\.(weight|bias)$/.test(spec.key))
      permuted.set(spec.key, spec.key.includes('q_proj') ? config.numHeads : config.numKvHeads);
  }
  if (problems.length > 0)
    throw new GgufError(
      file,
      undefined,
      `tensors do not match ${config.architecture} with this metadata: ${problems.slice(0, 8).join(', ')}${problems.length > 8 ? ` and ${problems.length - 8} more` : ''}`,
    );
  const used = new Set(names.values());
  const extra = [...h.tensors.keys()].filter((n) => !used.has(n) && n !== 'rope_freqs.weight');
  if (extra.length > 0)
    throw new GgufError(
      file,
      undefined,
      `unexpected tensors for ${config.architecture}: ${extra.slice(0, 8).join(', ')}${extra.length > 8 ? ` and ${extra.length - 8} more` : ''}`,
    );
  let invFreq: Float32Array | undefined;
  const factors = h.tensors.get('rope_freqs.weight');
  if (factors) {
    const half = config.headDim / 2;
    if (factors.type !== 'F32' || factors.shape.length !== 1 || factors.shape[0] !== half)
      throw new GgufError(file, 'rope_freqs.weight', `must be F32 [${half}] (one divisor per rotary frequency)`);
    const div = new Float32Array((await source.readRange(file, factors.begin, factors.end)).slice().buffer);
    const base = ropeInvFreq({
      headDim: config.headDim,
      ropeTheta: (config.rope as { theta: number }).theta,
      ropeScaling: { rope_type: 'default' },
    }).invFreq;
    invFreq = Float32Array.from(base, (f, i) => f / (div[i] as number));
  }
  return { header: h, config, names, permuted, ropeInvFreq: invFreq, baseModelId: ggufBaseModelId(h) };
}

/** The precision a tensor keeps by default: its own block format, or f16 (k-quants: q8_0). */
function asStored(type: GgufSupportedType): WeightPrecision {
  if (type === 'Q8_0' || type === 'Q4_K' || type === 'Q6_K') return 'q8_0';
  if (type === 'Q4_0') return 'q4_0';
  return 'f16';
}

/** Puts llama.cpp's permuted rows (per head, rotary pairs interleaved) back in HF order. */
function unpermuteRows(bytes: Uint8Array, rows: number, rowBytes: number, heads: number): Uint8Array {
  const out = new Uint8Array(bytes.byteLength);
  const hd = rows / heads;
  for (let h = 0; h < heads; h++) {
    for (let j = 0; j < 2; j++) {
      for (let i = 0; i < hd / 2; i++) {
        const hf = h * hd + j * (hd / 2) + i;
        const gg = h * hd + 2 * i + j;
        out.set(bytes.subarray(gg * rowBytes, (gg + 1) * rowBytes), hf * rowBytes);
      }
    }
  }
  return out;
}

/**
 * Uploads rows [first, first + rows) of a GGUF tensor into `t` ([rows, cols] of dtype dtype):
 * a block format kept as it is is copied block for block, anything else decoded to f32 and
 * converted; read in chunks of whole rows (an even count, so f16 pairs and scale words align).
 */
async function uploadRows(
  source: ModelSource,
  h: GgufHeader,
  info: GgufTensorInfo,
  t: Tensor,
  first: number,
  heads: number | undefined,
  onBytes: (n: number) => void,
  signal?: AbortSignal,
): Promise<void> {
  const type = info.type as GgufSupportedType;
  const [rows, cols] = (t.shape.length === 2 ? t.shape : [1, t.shape[0]]) as [number, number];
  const rowBytes = (info.end - info.begin) / (info.shape.length === 2 ? (info.shape[0] as number) : 1);
  const copy = (type === 'Q8_0' && t.dtype === 'q8_0') || (type === 'Q4_0' && t.dtype === 'q4_0');
  const writer = copy ? undefined : valueWriter(t, { file: h.file, name: info.name });
  const read = async (r0: number, n: number) => {
    const start = info.begin + (first + r0) * rowBytes;
    return source.readRange(h.file, start, start + n * rowBytes);
  };
  const put = (r0: number, n: number, bytes: Uint8Array) => {
    if (copy) {
      writeQuantizedBlocks(t, (r0 * cols) / 32, fromGgmlBlocks(t.dtype as 'q8_0' | 'q4_0', bytes, info.name));
    } else {
      const values = new Float32Array(n * cols);
      decodeGgml(type, bytes, values);
      (writer as { write(at: number, values: Float32Array): void }).write(r0 * cols, values);
    }
    onBytes(bytes.byteLength);
  };
  if (heads !== undefined) {
    // q and k projections: small enough to permute whole.
    put(0, rows, unpermuteRows(await read(0, rows), rows, rowBytes, heads));
    return;
  }
  let per = Math.max(2, Math.floor((8 * 2 ** 20) / rowBytes));
  per -= per % 2;
  for (let r0 = 0; r0 < rows; r0 += per) {
    signal?.throwIfAborted();
    const n = Math.min(per, rows - r0);
    put(r0, n, await read(r0, n));
  }
}

/**
 * The dtype each parameter gets on the GPU: at `precision`, or (undefined) each tensor as its
 * file format allows (see the module comment). loadGgufModel and memory plans both use it.
 */
export function ggufStoredDTypes(g: GgufModel, precision?: WeightPrecision): Map<string, DType> {
  const out = new Map<string, DType>();
  for (const spec of parameterTable(g.config)) {
    const info = g.header.tensors.get(g.names.get(spec.key) as string) as GgufTensorInfo;
    out.set(spec.key, storedDType(spec, precision ?? asStored(info.type as GgufSupportedType)));
  }
  return out;
}

/** The nominal precision of a model stored as `dtypes`: the block format most of its linear
 * weights keep, else f16. */
export function ggufPrecision(dtypes: ReadonlyMap<string, DType>): WeightPrecision {
  let q8 = 0;
  let q4 = 0;
  for (const d of dtypes.values()) {
    if (d === 'q8_0') q8++;
    if (d === 'q4_0') q4++;
  }
  return q4 > 0 && q4 >= q8 ? 'q4_0' : q8 > 0 ? 'q8_0' : 'f16';
}

/**
 * Identifies a GGUF file's weights (what a checkpoint or an adapter records to be used with the
 * same base again): a SHA-256 over the header's first 64 KiB and 256 bytes from the middle of every
 * tensor, as modelFingerprint does for safetensors.
 */
export async function ggufFingerprint(source: ModelSource, file: string): Promise<string> {
  const h = await readGgufHeader(source, file);
  const parts: Uint8Array[] = [await source.readRange(file, 0, Math.min(h.dataStart, 65536))];
  for (const t of [...h.tensors.values()].sort((a, b) => a.begin - b.begin)) {
    const start = t.begin + Math.max(0, Math.floor((t.end - t.begin - 256) / 2));
    parts.push(await source.readRange(file, start, Math.min(t.end, start + 256)));
  }
  const all = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.byteLength;
  }
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', all));
  return [...digest.slice(0, 16)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** Loads a GGUF file of `source` onto the GPU (see the module comment). */
export async function loadGgufModel(
  ctx: GpuContext,
  source: ModelSource,
  file: string,
  options: LoadModelOptions = {},
): Promise<CausalLM> {
  options.onProgress?.({ status: 'config', loaded: 0, total: 0 });
  const g = await openGgufModel(source, file);
  const { config, header: h } = g;
  const layout = modelLayout(config);
  const specs = parameterTable(config);
  let total = 0;
  for (const spec of specs) {
    const info = h.tensors.get(g.names.get(spec.key) as string) as GgufTensorInfo;
    total += info.end - info.begin;
  }
  const tensors = new Map<string, Tensor>();
  const tables = new Map<string, SplitRows>();
  const owned: Tensor[] = [];
  const storedDTypes = ggufStoredDTypes(g, options.precision);
  const partBytes = options.tablePartBytes ?? tablePartLimit(ctx.limits);
  let loaded = 0;
  const progress = (spec: ParamSpec) => (n: number) => {
    loaded += n;
    options.onProgress?.({ status: 'weights', loaded, total, tensor: spec.key });
  };
  try {
    for (const spec of specs) {
      const name = g.names.get(spec.key) as string;
      const info = h.tensors.get(name) as GgufTensorInfo;
      const dtype = storedDTypes.get(spec.key) as WeightDType;
      const shape = gpuShape(spec);
      const isTable = spec.key === layout.embed || spec.key === layout.lmHead;
      const parts = isTable
        ? splitRowCounts(shape[0] as number, shape[1] as number, dtype, partBytes)
        : [shape[0] as number];
      const made: Tensor[] = [];
      let start = 0;
      for (const rows of shape.length === 2 ? parts : [1]) {
        const partShape = shape.length === 2 ? [rows, shape[1] as number] : shape;
        const label = parts.length > 1 ? `${spec.key}[${start}:${start + rows}]` : spec.key;
        const t = createTensor(ctx, partShape, dtype, label);
        owned.push(t);
        made.push(t);
        await uploadRows(source, h, info, t, start, g.permuted.get(spec.key), progress(spec), options.signal);
        ctx.assertAlive();
        start += rows;
      }
      if (made.length > 1) tables.set(spec.key, new SplitRows(made, spec.key));
      else tensors.set(spec.key, made[0] as Tensor);
    }
    // The model's nominal precision: the one asked for, or the block format most weights keep.
    const precision = options.precision ?? ggufPrecision(storedDTypes);
    options.onProgress?.({ status: 'ready', loaded: total, total });
    return assembleModel(ctx, {
      config,
      layout,
      precision,
      tensors,
      tables,
      owned,
      description: `${source.description}/${file}`,
      tablePartBytes: partBytes,
      ropeInvFreq: g.ropeInvFreq,
      baseModelId: g.baseModelId,
      storedDTypes,
    });
  } catch (e) {
    for (const t of owned) t.dispose();
    throw e;
  }
}

/** Whether a file name is a GGUF file's. */
export function isGgufFileName(name: string): boolean {
  return /\.gguf$/i.test(name);
}
