/**
 * What each supported architecture stores and how it maps onto GPU buffers: the parameter table
 * (HF key, stored shape, transposition, precision) that the loader asserts key by key, and the
 * list of linear modules (the names PEFT targets).
 */
import type { ModelConfig } from './config.js';

/** How a stored tensor becomes a GPU buffer. */
export interface ParamSpec {
  /** Canonical HF key (GPT-2 checkpoints may omit the 'transformer.' prefix; the loader accepts both). */
  readonly key: string;
  /** Shape as stored in the checkpoint. */
  readonly shape: readonly number[];
  /** GPT-2's Conv1D stores [in, out]; the engine keeps every linear weight as [out, in]. */
  readonly transpose: boolean;
  /** 'weight': the model's weight precision (f16 by default); 'f32': always f32 (norms, biases:
   * small, and read at full precision by their kernels). */
  readonly precision: 'weight' | 'f32';
  /** A linear module's weight (not an embedding, the positions or the LM head): the matrices a
   * block-quantized precision (q8_0, q4_0) applies to. */
  readonly linear?: boolean;
}

/** A linear layer by its HF module path, e.g. model.layers.0.self_attn.q_proj. */
export interface LinearModule {
  readonly name: string;
  /** Conv1D for GPT-2 (PEFT then needs fan_in_fan_out), Linear otherwise. */
  readonly kind: 'linear' | 'conv1d';
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly layer: number;
  readonly bias: boolean;
  /** Which projection of the layer it is. */
  readonly role: LinearRole;
}

export type LinearRole = 'q' | 'k' | 'v' | 'qkv' | 'o' | 'gate' | 'up' | 'fc' | 'down';

export interface LayerKeys {
  readonly norm1: { readonly w: string; readonly b?: string };
  readonly norm2: { readonly w: string; readonly b?: string };
  readonly qNorm?: string;
  readonly kNorm?: string;
  readonly linears: readonly LinearModule[];
}

export interface ModelLayout {
  readonly embed: string;
  readonly positions?: string;
  readonly layers: readonly LayerKeys[];
  readonly finalNorm: { readonly w: string; readonly b?: string };
  /** Undefined when tied to the embedding. */
  readonly lmHead?: string;
  /** The output layer's module name (excluded by PEFT's 'all-linear'). */
  readonly lmHeadModule: string;
}

/** Checkpoint keys that carry no parameters (buffers older exports saved); ignored on load. */
export function isIgnorableKey(config: ModelConfig, key: string): boolean {
  if (config.family === 'gpt2') return /(^|\.)h\.\d+\.attn\.(bias|masked_bias)$/.test(key);
  return /rotary_emb\.inv_freq$/.test(key);
}

function llamaLayer(c: ModelConfig, i: number): LayerKeys {
  const p = `model.layers.${i}`;
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const d = c.hiddenSize;
  const I = c.intermediateSize;
  const lin = (name: string, role: LinearRole, inF: number, outF: number, bias: boolean): LinearModule => ({
    name: `${p}.${name}`,
    kind: 'linear',
    inFeatures: inF,
    outFeatures: outF,
    layer: i,
    bias,
    role,
  });
  return {
    norm1: { w: `${p}.input_layernorm.weight` },
    norm2: { w: `${p}.post_attention_layernorm.weight` },
    qNorm: c.qkNorm ? `${p}.self_attn.q_norm.weight` : undefined,
    kNorm: c.qkNorm ? `${p}.self_attn.k_norm.weight` : undefined,
    linears: [
      lin('self_attn.q_proj', 'q', d, q, c.qkvBias),
      lin('self_attn.k_proj', 'k', d, kv, c.qkvBias),
      lin('self_attn.v_proj', 'v', d, kv, c.qkvBias),
      lin('self_attn.o_proj', 'o', q, d, c.oBias),
      lin('mlp.gate_proj', 'gate', d, I, c.mlpBias),
      lin('mlp.up_proj', 'up', d, I, c.mlpBias),
      lin('mlp.down_proj', 'down', I, d, c.mlpBias),
    ],
  };
}

function gpt2Layer(c: ModelConfig, i: number): LayerKeys {
  const p = `transformer.h.${i}`;
  const d = c.hiddenSize;
  const I = c.intermediateSize;
  const conv = (name: string, role: LinearRole, inF: number, outF: number): LinearModule => ({
    name: `${p}.${name}`,
    kind: 'conv1d',
    inFeatures: inF,
    outFeatures: outF,
    layer: i,
    bias: true,
    role,
  });
  return {
    norm1: { w: `${p}.ln_1.weight`, b: `${p}.ln_1.bias` },
    norm2: { w: `${p}.ln_2.weight`, b: `${p}.ln_2.bias` },
    linears: [
      conv('attn.c_attn', 'qkv', d, 3 * d),
      conv('attn.c_proj', 'o', d, d),
      conv('mlp.c_fc', 'fc', d, I),
      conv('mlp.c_proj', 'down', I, d),
    ],
  };
}

export function modelLayout(c: ModelConfig): ModelLayout {
  const layers: LayerKeys[] = [];
  for (let i = 0; i < c.numLayers; i++) layers.push(c.family === 'gpt2' ? gpt2Layer(c, i) : llamaLayer(c, i));
  if (c.family === 'gpt2') {
    return {
      embed: 'transformer.wte.weight',
      positions: 'transformer.wpe.weight',
      layers,
      finalNorm: { w: 'transformer.ln_f.weight', b: 'transformer.ln_f.bias' },
      lmHead: c.tieWordEmbeddings ? undefined : 'lm_head.weight',
      lmHeadModule: 'lm_head',
    };
  }
  return {
    embed: 'model.embed_tokens.weight',
    layers,
    finalNorm: { w: 'model.norm.weight' },
    lmHead: c.tieWordEmbeddings ? undefined : 'lm_head.weight',
    lmHeadModule: 'lm_head',
  };
}

/** Every linear module of the model, in layer order (what LoRA can adapt). */
export function linearModules(c: ModelConfig): LinearModule[] {
  return modelLayout(c).layers.flatMap((l) => l.linears);
}

/** The full parameter table: every key the checkpoint must hold, with its shape. */
export function parameterTable(c: ModelConfig): ParamSpec[] {
  const layout = modelLayout(c);
  const d = c.hiddenSize;
  const specs: ParamSpec[] = [];
  const weight = (key: string, shape: number[], transpose = false, linear = false) =>
    specs.push({ key, shape, transpose, precision: 'weight', ...(linear ? { linear } : {}) });
  const small = (key: string, shape: number[]) => specs.push({ key, shape, transpose: false, precision: 'f32' });
  weight(layout.embed, [c.vocabSize, d]);
  if (layout.positions) weight(layout.positions, [c.maxPositions, d]);
  for (const l of layout.layers) {
    small(l.norm1.w, [d]);
    if (l.norm1.b) small(l.norm1.b, [d]);
    small(l.norm2.w, [d]);
    if (l.norm2.b) small(l.norm2.b, [d]);
    if (l.qNorm) small(l.qNorm, [c.headDim]);
    if (l.kNorm) small(l.kNorm, [c.headDim]);
    for (const m of l.linears) {
      // Conv1D stores [in, out]; transposed on upload so every weight is [out, in].
      if (m.kind === 'conv1d') weight(`${m.name}.weight`, [m.inFeatures, m.outFeatures], true, true);
      else weight(`${m.name}.weight`, [m.outFeatures, m.inFeatures], false, true);
      if (m.bias) small(`${m.name}.bias`, [m.outFeatures]);
    }
  }
  small(layout.finalNorm.w, [d]);
  if (layout.finalNorm.b) small(layout.finalNorm.b, [d]);
  if (layout.lmHead) weight(layout.lmHead, [c.vocabSize, d]);
  return specs;
}

/** Number of parameters (the tied head counted once). */
export function parameterCount(c: ModelConfig): number {
  return parameterTable(c).reduce((n, p) => n + p.shape.reduce((a, b) => a * b, 1), 0);
}

/** A module as PyTorch's named_modules() lists it for the HF class (PEFT matches names in it). */
export interface NamedModule {
  readonly name: string;
  /** 'lm_head' is the output layer (get_output_embeddings()); 'other' is everything that holds no
   * adaptable weight (blocks, norms, lists, dropout, activations). */
  readonly kind: 'linear' | 'conv1d' | 'embedding' | 'lm_head' | 'other';
  readonly inFeatures?: number;
  readonly outFeatures?: number;
  readonly layer?: number;
}

/**
 * Every module of the model in named_modules() order (the root excluded), as transformers builds
 * LlamaForCausalLM / Qwen2 / Qwen3 / GPT2LMHeadModel. PEFT resolves target_modules against this
 * list, and 'all-linear' shortens its saved target list with it.
 */
export function namedModules(c: ModelConfig): NamedModule[] {
  const out: NamedModule[] = [];
  const other = (name: string, layer?: number) => out.push({ name, kind: 'other', layer });
  const lin = (m: LinearModule) =>
    out.push({ name: m.name, kind: m.kind, inFeatures: m.inFeatures, outFeatures: m.outFeatures, layer: m.layer });
  const layout = modelLayout(c);
  if (c.family === 'gpt2') {
    other('transformer');
    out.push({ name: 'transformer.wte', kind: 'embedding', inFeatures: c.vocabSize, outFeatures: c.hiddenSize });
    out.push({ name: 'transformer.wpe', kind: 'embedding', inFeatures: c.maxPositions, outFeatures: c.hiddenSize });
    other('transformer.drop');
    other('transformer.h');
    layout.layers.forEach((l, i) => {
      const p = `transformer.h.${i}`;
      const [cAttn, cProj, cFc, mlpProj] = l.linears as [LinearModule, LinearModule, LinearModule, LinearModule];
      other(p, i);
      other(`${p}.ln_1`, i);
      other(`${p}.attn`, i);
      lin(cAttn);
      lin(cProj);
      other(`${p}.attn.attn_dropout`, i);
      other(`${p}.attn.resid_dropout`, i);
      other(`${p}.ln_2`, i);
      other(`${p}.mlp`, i);
      lin(cFc);
      lin(mlpProj);
      other(`${p}.mlp.act`, i);
      other(`${p}.mlp.dropout`, i);
    });
    other('transformer.ln_f');
  } else {
    other('model');
    out.push({ name: 'model.embed_tokens', kind: 'embedding', inFeatures: c.vocabSize, outFeatures: c.hiddenSize });
    other('model.layers');
    layout.layers.forEach((l, i) => {
      const p = `model.layers.${i}`;
      const [q, k, v, o, gate, up, down] = l.linears as LinearModule[];
      other(p, i);
      other(`${p}.self_attn`, i);
      for (const m of [q, k, v, o]) lin(m as LinearModule);
      if (c.qkNorm) {
        other(`${p}.self_attn.q_norm`, i);
        other(`${p}.self_attn.k_norm`, i);
      }
      other(`${p}.mlp`, i);
      for (const m of [gate, up, down]) lin(m as LinearModule);
      other(`${p}.mlp.act_fn`, i);
      other(`${p}.input_layernorm`, i);
      other(`${p}.post_attention_layernorm`, i);
    });
    other('model.norm');
    other('model.rotary_emb');
  }
  out.push({ name: 'lm_head', kind: 'lm_head', inFeatures: c.hiddenSize, outFeatures: c.vocabSize });
  return out;
}
