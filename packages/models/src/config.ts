/**
 * Hugging Face config.json -> a validated, typed ModelConfig. Every field the engine relies on is
 * checked here, so later code never meets an undefined. An architecture or a setting we do not
 * implement is a ConfigError that says what is supported, never a silently wrong model.
 */
import { WebtuneError } from '@webtune/core';

export class ConfigError extends WebtuneError {
  constructor(
    readonly file: string,
    readonly field: string | undefined,
    readonly reason: string,
  ) {
    super(`${file}${field ? `: ${field}` : ''}: ${reason}`);
  }
}

export const SUPPORTED_ARCHITECTURES = {
  LlamaForCausalLM: 'llama',
  Qwen2ForCausalLM: 'qwen2',
  Qwen3ForCausalLM: 'qwen3',
  GPT2LMHeadModel: 'gpt2',
} as const;

export type Family = (typeof SUPPORTED_ARCHITECTURES)[keyof typeof SUPPORTED_ARCHITECTURES];

export type RopeScalingConfig =
  | { readonly rope_type: 'default' }
  | {
      readonly rope_type: 'llama3';
      readonly factor: number;
      readonly low_freq_factor: number;
      readonly high_freq_factor: number;
      readonly original_max_position_embeddings: number;
    };

export interface ModelConfig {
  /** The HF class, e.g. 'LlamaForCausalLM'. */
  readonly architecture: keyof typeof SUPPORTED_ARCHITECTURES;
  /** Which layer structure the engine builds. */
  readonly family: Family;
  /** config.model_type ('llama', 'qwen2', 'qwen3', 'gpt2'): what PEFT keys its defaults on. */
  readonly modelType: string;
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly numLayers: number;
  readonly numHeads: number;
  readonly numKvHeads: number;
  readonly headDim: number;
  readonly intermediateSize: number;
  readonly maxPositions: number;
  readonly norm: { readonly kind: 'rms' | 'layer'; readonly eps: number };
  /** Absent for GPT-2 (learned positions). */
  readonly rope?: { readonly theta: number; readonly scaling: RopeScalingConfig };
  readonly activation: 'silu' | 'gelu_new';
  readonly tieWordEmbeddings: boolean;
  /** Bias on q, k, v (Qwen2 always; Llama/Qwen3 when attention_bias). */
  readonly qkvBias: boolean;
  /** Bias on the attention output projection (Llama/Qwen3 attention_bias; GPT-2 always). */
  readonly oBias: boolean;
  /** Bias on the MLP projections (Llama mlp_bias; GPT-2 always). */
  readonly mlpBias: boolean;
  /** Qwen3's per-head RMSNorm of q and k. */
  readonly qkNorm: boolean;
  readonly bosTokenId?: number;
  readonly eosTokenIds: readonly number[];
}

type Json = Record<string, unknown>;

class Reader {
  constructor(
    readonly file: string,
    readonly json: Json,
  ) {}

  fail(field: string | undefined, reason: string): never {
    throw new ConfigError(this.file, field, reason);
  }

  has(key: string): boolean {
    return this.json[key] !== undefined && this.json[key] !== null;
  }

  int(key: string, fallback?: number, min = 1): number {
    const v = this.json[key];
    if (v === undefined || v === null) {
      if (fallback !== undefined) return fallback;
      this.fail(key, 'is missing');
    }
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min)
      this.fail(key, `must be an integer ≥ ${min}, got ${JSON.stringify(v)}`);
    return v;
  }

  num(key: string, fallback?: number): number {
    const v = this.json[key];
    if (v === undefined || v === null) {
      if (fallback !== undefined) return fallback;
      this.fail(key, 'is missing');
    }
    if (typeof v !== 'number' || !Number.isFinite(v)) this.fail(key, `must be a number, got ${JSON.stringify(v)}`);
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.json[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'boolean') this.fail(key, `must be true or false, got ${JSON.stringify(v)}`);
    return v;
  }

  str(key: string, fallback?: string): string {
    const v = this.json[key];
    if (v === undefined || v === null) {
      if (fallback !== undefined) return fallback;
      this.fail(key, 'is missing');
    }
    if (typeof v !== 'string') this.fail(key, `must be a string, got ${JSON.stringify(v)}`);
    return v;
  }

  /** Refuses a setting we would otherwise ignore and compute a different model with. */
  requireValue(key: string, allowed: readonly unknown[], why: string): void {
    const v = this.json[key];
    if (v === undefined || v === null) return;
    if (!allowed.includes(v))
      this.fail(
        key,
        `${JSON.stringify(v)} is not supported (${why}); supported: ${allowed.map((a) => JSON.stringify(a)).join(', ')}`,
      );
  }
}

function tokenIds(r: Reader, key: string): number[] {
  const v = r.json[key];
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const id of list)
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0)
      r.fail(key, `must be a token id or a list of them, got ${JSON.stringify(v)}`);
  return list as number[];
}

function ropeConfig(r: Reader): { theta: number; scaling: RopeScalingConfig } {
  // transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta +
  // rope_scaling. Accept both.
  const params = r.json.rope_parameters as Json | undefined;
  const scaling = (params ?? r.json.rope_scaling ?? null) as Json | null;
  const theta = params && typeof params.rope_theta === 'number' ? params.rope_theta : r.num('rope_theta', 10000);
  if (!scaling) return { theta, scaling: { rope_type: 'default' } };
  const type = scaling.rope_type ?? scaling.type;
  const field = params ? 'rope_parameters' : 'rope_scaling';
  if (type === 'default' || type === undefined) return { theta, scaling: { rope_type: 'default' } };
  if (type === 'llama3') {
    const need = ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'] as const;
    for (const k of need) if (typeof scaling[k] !== 'number') r.fail(`${field}.${k}`, 'is missing or not a number');
    return {
      theta,
      scaling: {
        rope_type: 'llama3',
        factor: scaling.factor as number,
        low_freq_factor: scaling.low_freq_factor as number,
        high_freq_factor: scaling.high_freq_factor as number,
        original_max_position_embeddings: scaling.original_max_position_embeddings as number,
      },
    };
  }
  return r.fail(`${field}.rope_type`, `${JSON.stringify(type)} is not supported; supported: "default", "llama3"`);
}

/** Validates a parsed config.json. `file` names it in errors. */
export function parseModelConfig(json: unknown, file = 'config.json'): ModelConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    throw new ConfigError(file, undefined, 'is not a JSON object');
  const r: Reader = new Reader(file, json as Json);
  const archs: unknown = r.json.architectures;
  const supported = Object.keys(SUPPORTED_ARCHITECTURES).join(', ');
  if (!Array.isArray(archs) || archs.length === 0) r.fail('architectures', `is missing; supported: ${supported}`);
  const architecture = archs.find((a) => typeof a === 'string' && a in SUPPORTED_ARCHITECTURES) as
    | keyof typeof SUPPORTED_ARCHITECTURES
    | undefined;
  if (!architecture) r.fail('architectures', `${JSON.stringify(archs)} is not supported; supported: ${supported}`);
  const family = SUPPORTED_ARCHITECTURES[architecture];
  const modelType = r.str('model_type', family);
  const eosTokenIds = tokenIds(r, 'eos_token_id');
  const bos = tokenIds(r, 'bos_token_id');

  if (family === 'gpt2') {
    const d = r.int('n_embd');
    const heads = r.int('n_head');
    if (d % heads !== 0) r.fail('n_head', `${heads} does not divide n_embd ${d}`);
    r.requireValue('activation_function', ['gelu_new'], 'GPT-2 is implemented with gelu_new');
    r.requireValue('scale_attn_by_inverse_layer_idx', [false], 'not implemented');
    r.requireValue('reorder_and_upcast_attn', [false], 'not implemented');
    r.requireValue('scale_attn_weights', [true], 'not implemented');
    return {
      architecture,
      family,
      modelType,
      vocabSize: r.int('vocab_size'),
      hiddenSize: d,
      numLayers: r.int('n_layer'),
      numHeads: heads,
      numKvHeads: heads,
      headDim: d / heads,
      intermediateSize: r.has('n_inner') ? r.int('n_inner') : 4 * d,
      maxPositions: r.int('n_positions'),
      norm: { kind: 'layer', eps: r.num('layer_norm_epsilon', 1e-5) },
      activation: 'gelu_new',
      tieWordEmbeddings: r.bool('tie_word_embeddings', true),
      qkvBias: true,
      oBias: true,
      mlpBias: true,
      qkNorm: false,
      bosTokenId: bos[0],
      eosTokenIds,
    };
  }

  const d = r.int('hidden_size');
  const heads = r.int('num_attention_heads');
  const kvHeads = r.int('num_key_value_heads', heads);
  if (heads % kvHeads !== 0) r.fail('num_key_value_heads', `${kvHeads} does not divide num_attention_heads ${heads}`);
  if (!r.has('head_dim') && d % heads !== 0)
    r.fail('num_attention_heads', `${heads} does not divide hidden_size ${d} and no head_dim is given`);
  const headDim = r.int('head_dim', d / heads);
  r.requireValue('hidden_act', ['silu'], 'the SiLU-gated MLP is implemented');
  if (family === 'qwen2' || family === 'qwen3') {
    r.requireValue('use_sliding_window', [false], 'sliding-window attention is not implemented');
  }
  r.requireValue('pretraining_tp', [1], 'tensor-parallel slicing is not implemented');
  const attentionBias = r.bool('attention_bias', false);
  return {
    architecture,
    family,
    modelType,
    vocabSize: r.int('vocab_size'),
    hiddenSize: d,
    numLayers: r.int('num_hidden_layers'),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    intermediateSize: r.int('intermediate_size'),
    maxPositions: r.int('max_position_embeddings'),
    norm: { kind: 'rms', eps: r.num('rms_norm_eps', 1e-6) },
    rope: ropeConfig(r),
    activation: 'silu',
    tieWordEmbeddings: r.bool('tie_word_embeddings', false),
    // Qwen2's q/k/v always carry a bias, whatever attention_bias says.
    qkvBias: family === 'qwen2' ? true : attentionBias,
    oBias: family === 'qwen2' ? false : attentionBias,
    mlpBias: family === 'llama' ? r.bool('mlp_bias', false) : false,
    qkNorm: family === 'qwen3',
    bosTokenId: bos[0],
    eosTokenIds,
  };
}
