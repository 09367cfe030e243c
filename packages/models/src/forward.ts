/**
 * The forward pass of a causal LM as one list of dispatches, planned once per (model, batch,
 * sequence length) with every buffer allocated up front. `inference` shares one set of activation
 * buffers between layers; `train` keeps each layer's activations for the backward pass.
 *
 *   ids -> embedding (+ learned positions) -> N × [norm -> attention -> residual -> norm -> MLP
 *   -> residual] -> final norm -> hidden (and, when asked, logits for every row)
 *
 * Linear layers that carry a LoRA adapter run the fused LoRA kernels (packages/core
 * lora_matmul) and keep h = x·Aᵀ for the backward.
 */
import {
  type AttentionForwardArgs,
  createTensor,
  type Dispatch,
  fusedQkvLayout,
  type GpuContext,
  type LoraDropout,
  planAddScaled,
  planAttentionForward,
  planEmbeddingTable,
  planGeluNewForward,
  planLayerNormForward,
  planLoraForward,
  planMatmul,
  planRmsNormForward,
  planRopeForward,
  planSiluMulForward,
  planTableProduct,
  ShapeError,
  type Tensor,
  tensorView,
} from '@webtune/core';
import type { LinearRole } from './architecture.js';
import type { CausalLM, Layer, Linear, Norm } from './model.js';

/** A LoRA adapter's tensors for one linear module. */
export interface LoraModuleWeights {
  /** [r, in] f32. */
  readonly a: Tensor;
  /** [out, r] f32. */
  readonly b: Tensor;
  readonly scale: number;
  /** LoRA dropout in training (PEFT's lora_dropout): probability p > 0, and which module's mask. */
  readonly dropout?: { readonly p: number; readonly module: number };
}

/** Adapter weights by HF module name (model.layers.0.self_attn.q_proj). */
export type LoraWeightsByModule = ReadonlyMap<string, LoraModuleWeights>;

export interface ForwardOptions {
  readonly B: number;
  readonly T: number;
  /** 'train' keeps every layer's activations for the backward. Default 'inference'. */
  readonly mode?: 'inference' | 'train';
  /**
   * Train mode only: keep just each layer's input and share one set of layer activations; the
   * backward replays each layer's forward before differentiating it. Trades one extra forward
   * pass for roughly L-fold less activation memory.
   */
  readonly recompute?: boolean;
  /** Also compute logits [B·T, vocab] (tests and tiny models only: the loss path never does). */
  readonly logits?: boolean;
  readonly lora?: LoraWeightsByModule;
  readonly label?: string;
  /**
   * Train mode with LoRA dropout: the u32 [4] counter (seed, step, micro-batch, 0) its masks hash,
   * which the trainer rewrites per micro-batch. Required when an adapted module has dropout.
   */
  readonly dropoutCounter?: Tensor;
}

/** LoRA dropout's state in a train-mode plan: the counter and a [rows, max in] scratch shared by
 * the layers (each module's masked input, used at once by its h and again in the backward). */
export interface DropoutState {
  readonly counter: Tensor;
  readonly scratch: Tensor;
}

/** Statistics a norm saves for its backward. */
export interface NormStats {
  readonly rstd: Tensor;
  /** LayerNorm only. */
  readonly mean?: Tensor;
}

/** One layer's activations. In inference mode all layers share one set (but x and out). */
export interface LayerActivations {
  /** Layer input (the residual stream), [rows, d]. */
  readonly x: Tensor;
  readonly n1: Tensor;
  readonly n1Stats: NormStats;
  /** Llama family: q [rows, nH·hd] and k, v [rows, nKV·hd], after the per-head norm and RoPE. */
  readonly q?: Tensor;
  readonly k?: Tensor;
  readonly v?: Tensor;
  /** Qwen3: q and k before their per-head norm (its backward needs them), and the norms' rstd. */
  readonly qRaw?: Tensor;
  readonly kRaw?: Tensor;
  readonly qNormStats?: NormStats;
  readonly kNormStats?: NormStats;
  /** GPT-2: the fused c_attn output [rows, 3d]. */
  readonly qkv?: Tensor;
  /** Attention output before o_proj, [rows, nH·hd], and its log-sum-exp [B, nH, T]. */
  readonly attn: Tensor;
  readonly lse: Tensor;
  readonly attnOut: Tensor;
  /** x + attnOut. */
  readonly mid: Tensor;
  readonly n2: Tensor;
  readonly n2Stats: NormStats;
  /** Llama family: gate and up [rows, I]; GPT-2: fc [rows, I] in `gate`. */
  readonly gate: Tensor;
  readonly up?: Tensor;
  /** silu(gate)·up, or gelu_new(fc). */
  readonly act: Tensor;
  readonly mlpOut: Tensor;
  /** mid + mlpOut: the next layer's x. */
  readonly out: Tensor;
  /** LoRA's h = x·Aᵀ for each adapted projection of this layer. */
  readonly loraH: ReadonlyMap<LinearRole, Tensor>;
}

export class ForwardPlan {
  constructor(
    readonly model: CausalLM,
    readonly B: number,
    readonly T: number,
    readonly mode: 'inference' | 'train',
    /** [B·T] i32 token ids: write them before submitting. */
    readonly ids: Tensor,
    /** Embedding output, the first layer's x. */
    readonly embedded: Tensor,
    readonly layers: readonly LayerActivations[],
    /** Final norm output [B·T, d] (what the LM head and the loss read). */
    readonly hidden: Tensor,
    readonly finalStats: NormStats,
    readonly logits: Tensor | undefined,
    /** u32 [2]: the embedding kernel's out-of-range flags (cleared at each step). */
    readonly embeddingErrors: Tensor,
    readonly dispatches: readonly Dispatch[],
    private readonly owned: readonly Tensor[],
    /** Each layer's forward dispatches (a subset of `dispatches`), replayed by a recomputing backward. */
    readonly layerDispatches: readonly (readonly Dispatch[])[],
    /** Activations are shared between layers and must be recomputed for the backward. */
    readonly recompute: boolean,
    /** LoRA dropout's counter and scratch, when an adapted module has dropout. */
    readonly dropout?: DropoutState,
  ) {}

  get rows(): number {
    return this.B * this.T;
  }

  /** Bytes of the activation buffers this plan allocated. */
  get activationBytes(): number {
    return this.owned.reduce((n, t) => n + t.byteLength, 0);
  }

  dispose(): void {
    for (const d of this.dispatches) d.dispose();
    for (const t of this.owned) t.dispose();
  }
}

export class Allocator {
  readonly owned: Tensor[] = [];
  constructor(
    readonly ctx: GpuContext,
    readonly prefix: string,
  ) {}
  f32(shape: number[], label: string): Tensor {
    const t = createTensor(this.ctx, shape, 'f32', `${this.prefix}.${label}`);
    this.owned.push(t);
    return t;
  }
  of(shape: number[], dtype: 'i32' | 'u32', label: string): Tensor {
    const t = createTensor(this.ctx, shape, dtype, `${this.prefix}.${label}`);
    this.owned.push(t);
    return t;
  }
}

export function normStats(alloc: Allocator, rows: number, layer: boolean, label: string): NormStats {
  return { rstd: alloc.f32([rows], `${label}.rstd`), mean: layer ? alloc.f32([rows], `${label}.mean`) : undefined };
}

function linear(layer: Layer, role: LinearRole): Linear {
  const l = layer.linears[role];
  if (!l) throw new Error(`layer ${layer.index} has no ${role} projection`);
  return l;
}

/** Allocates one layer's activations; `shared` supplies the ones inference reuses across layers. */
export function allocateLayer(
  alloc: Allocator,
  model: CausalLM,
  rows: number,
  B: number,
  T: number,
  layerIndex: number,
  x: Tensor,
  out: Tensor,
  lora: LoraWeightsByModule | undefined,
  shared?: LayerActivations,
): LayerActivations {
  const c = model.config;
  const d = c.hiddenSize;
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const p = `layer${shared ? '' : layerIndex}`;
  const ln = c.norm.kind === 'layer';
  const gpt2 = c.family === 'gpt2';
  const layer = model.layers[layerIndex] as Layer;
  const loraH = new Map<LinearRole, Tensor>();
  for (const [role, lin] of Object.entries(layer.linears) as [LinearRole, Linear][]) {
    const w = lora?.get(lin.module.name);
    if (w) loraH.set(role, alloc.f32([rows, w.a.shape[0] as number], `${p}.${role}.lora_h`));
  }
  if (shared) {
    // Shared between layers, except the residual stream and LoRA's h (ranks can differ).
    return { ...shared, x, out, loraH };
  }
  return {
    x,
    n1: alloc.f32([rows, d], `${p}.n1`),
    n1Stats: normStats(alloc, rows, ln, `${p}.n1`),
    q: gpt2 ? undefined : alloc.f32([rows, qDim], `${p}.q`),
    k: gpt2 ? undefined : alloc.f32([rows, kvDim], `${p}.k`),
    v: gpt2 ? undefined : alloc.f32([rows, kvDim], `${p}.v`),
    qRaw: c.qkNorm ? alloc.f32([rows, qDim], `${p}.q_raw`) : undefined,
    kRaw: c.qkNorm ? alloc.f32([rows, kvDim], `${p}.k_raw`) : undefined,
    qNormStats: c.qkNorm ? normStats(alloc, rows * c.numHeads, false, `${p}.q_norm`) : undefined,
    kNormStats: c.qkNorm ? normStats(alloc, rows * c.numKvHeads, false, `${p}.k_norm`) : undefined,
    qkv: gpt2 ? alloc.f32([rows, 3 * d], `${p}.qkv`) : undefined,
    attn: alloc.f32([rows, qDim], `${p}.attn`),
    lse: alloc.f32([B, c.numHeads, T], `${p}.lse`),
    attnOut: alloc.f32([rows, d], `${p}.attn_out`),
    mid: alloc.f32([rows, d], `${p}.mid`),
    n2: alloc.f32([rows, d], `${p}.n2`),
    n2Stats: normStats(alloc, rows, ln, `${p}.n2`),
    gate: alloc.f32([rows, I], `${p}.${gpt2 ? 'fc' : 'gate'}`),
    up: gpt2 ? undefined : alloc.f32([rows, I], `${p}.up`),
    act: alloc.f32([rows, I], `${p}.act`),
    mlpOut: alloc.f32([rows, d], `${p}.mlp_out`),
    out,
    loraH,
  };
}

export async function planNorm(
  ctx: GpuContext,
  model: CausalLM,
  norm: Norm,
  x: Tensor,
  y: Tensor,
  stats: NormStats,
  label: string,
): Promise<Dispatch> {
  const eps = model.config.norm.eps;
  if (model.config.norm.kind === 'layer') {
    return planLayerNormForward(
      ctx,
      { x, w: norm.w, b: norm.b, y, mean: stats.mean as Tensor, rstd: stats.rstd },
      { eps, label },
    );
  }
  return planRmsNormForward(ctx, { x, w: norm.w, y, rstd: stats.rstd }, { eps, label });
}

/** The LoRA dropout of one module in a plan (undefined without dropout). */
export function loraDropout(
  lora: LoraModuleWeights | undefined,
  state: DropoutState | undefined,
  x: Tensor,
): LoraDropout | undefined {
  if (!lora?.dropout || lora.dropout.p <= 0 || !state) return undefined;
  const inF = lora.a.shape[1] as number;
  const rows = x.size / inF;
  return {
    mask: { p: lora.dropout.p, module: lora.dropout.module, counter: state.counter },
    scratch: tensorView(state.scratch, 0, [rows, inF], 'f32', `${state.scratch.label}[${rows}, ${inF}]`),
  };
}

/** y = x·Wᵀ + bias, or the fused LoRA form when the module has an adapter. */
export async function planLinear(
  ctx: GpuContext,
  lin: Linear,
  x: Tensor,
  y: Tensor,
  lora: LoraModuleWeights | undefined,
  h: Tensor | undefined,
  dropout?: DropoutState,
): Promise<Dispatch[]> {
  const label = lin.module.name;
  if (lora) {
    if (!h) throw new Error(`${label}: LoRA forward needs its h buffer`);
    const d = loraDropout(lora, dropout, x);
    return planLoraForward(
      ctx,
      { w0: lin.w, a: lora.a, b: lora.b, bias: lin.bias, scale: lora.scale },
      { x, y, h, ...(d ? { dropout: d } : {}) },
      label,
    );
  }
  return [await planMatmul(ctx, x, lin.w, y, { bias: lin.bias, label })];
}

/** Where a layer's q, k and v projections write (RoPE and the per-head norms act there in place). */
export type QkvDestination = { readonly q: Tensor; readonly k: Tensor; readonly v: Tensor } | { readonly qkv: Tensor };

/** Positions for RoPE: pos0 + row % T, or a per-row i32 buffer (generation). */
export interface Positions {
  readonly T: number;
  readonly pos0?: number;
  readonly positions?: Tensor;
}

/**
 * The attention block of one layer: the q, k, v projections (with Qwen3's per-head norms and
 * RoPE), then attention into a.attn. `attend` chooses what the attention kernel reads: the fresh
 * projections (training, evaluation, prefill) or a KV cache (decoding).
 */
export interface AttentionBlock {
  readonly dest: (a: LayerActivations, layer: number) => QkvDestination;
  readonly positions: Positions;
  /** Dispatches between the projections and attention (decode: copy k, v into the cache). */
  readonly afterProjections?: (a: LayerActivations, layer: number) => Promise<Dispatch[]>;
  readonly attend: (
    a: LayerActivations,
    layer: number,
    dest: QkvDestination,
  ) => Omit<AttentionForwardArgs, 'o' | 'lse'>;
  /** Receives each layer's planned attention dispatches (generation moves them along per token). */
  readonly onPlanned?: (layer: number, attention: readonly Dispatch[]) => void;
}

type Lin = (role: LinearRole, x: Tensor, y: Tensor) => Promise<void>;

async function planProjections(
  ctx: GpuContext,
  model: CausalLM,
  layer: Layer,
  a: LayerActivations,
  dest: QkvDestination,
  pos: Positions,
  lin: Lin,
  out: Dispatch[],
): Promise<void> {
  const c = model.config;
  const p = `layer${layer.index}`;
  if ('qkv' in dest) {
    await lin('qkv', a.n1, dest.qkv);
    return;
  }
  await lin('q', a.n1, a.qRaw ?? dest.q);
  await lin('k', a.n1, a.kRaw ?? dest.k);
  await lin('v', a.n1, dest.v);
  if (c.qkNorm) {
    const eps = c.norm.eps;
    out.push(
      await planRmsNormForward(
        ctx,
        { x: a.qRaw as Tensor, w: layer.qNorm as Tensor, y: dest.q, rstd: (a.qNormStats as NormStats).rstd },
        { eps, groups: c.numHeads, label: `${p}.q_norm` },
      ),
      await planRmsNormForward(
        ctx,
        { x: a.kRaw as Tensor, w: layer.kNorm as Tensor, y: dest.k, rstd: (a.kNormStats as NormStats).rstd },
        { eps, groups: c.numKvHeads, label: `${p}.k_norm` },
      ),
    );
  }
  const rope = { headDim: c.headDim, ...pos, attentionScaling: model.ropeAttentionScaling };
  const invFreq = model.ropeInvFreq as Tensor;
  out.push(
    await planRopeForward(ctx, dest.q, invFreq, { ...rope, nHeads: c.numHeads, label: `${p}.rope_q` }),
    await planRopeForward(ctx, dest.k, invFreq, { ...rope, nHeads: c.numKvHeads, label: `${p}.rope_k` }),
  );
}

/** Attention over the sequences' own fresh projections (B sequences of T tokens, from position 0). */
export function batchedAttention(model: CausalLM, B: number, T: number): AttentionBlock {
  const c = model.config;
  const dims = { B, Tq: T, Tk: T, pos0: 0, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim };
  return {
    positions: { T, pos0: 0 },
    dest: (a) =>
      c.family === 'gpt2' ? { qkv: a.qkv as Tensor } : { q: a.q as Tensor, k: a.k as Tensor, v: a.v as Tensor },
    attend: (_a, _l, dest) =>
      'qkv' in dest
        ? {
            q: dest.qkv,
            k: dest.qkv,
            v: dest.qkv,
            dims: { ...dims, ...fusedQkvLayout({ T, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim }) },
          }
        : { q: dest.q, k: dest.k, v: dest.v, dims },
  };
}

/** Plans one transformer layer: attention block, residual, norm, MLP, residual. */
export async function planLayer(
  ctx: GpuContext,
  model: CausalLM,
  layer: Layer,
  a: LayerActivations,
  attention: AttentionBlock,
  lora: LoraWeightsByModule | undefined,
  dropout?: DropoutState,
): Promise<Dispatch[]> {
  const c = model.config;
  const out: Dispatch[] = [];
  const p = `layer${layer.index}`;
  const lin: Lin = async (role, x, y) => {
    const l = linear(layer, role);
    out.push(...(await planLinear(ctx, l, x, y, lora?.get(l.module.name), a.loraH.get(role), dropout)));
  };

  out.push(await planNorm(ctx, model, layer.norm1, a.x, a.n1, a.n1Stats, `${p}.norm1`));
  const dest = attention.dest(a, layer.index);
  await planProjections(ctx, model, layer, a, dest, attention.positions, lin, out);
  if (attention.afterProjections) out.push(...(await attention.afterProjections(a, layer.index)));
  const attend = await planAttentionForward(
    ctx,
    { ...attention.attend(a, layer.index, dest), o: a.attn, lse: a.lse },
    `${p}.attention`,
  );
  attention.onPlanned?.(layer.index, attend);
  out.push(...attend);
  await lin('o', a.attn, a.attnOut);
  out.push(await planAddScaled(ctx, a.x, a.attnOut, a.mid, 1, `${p}.residual1`));
  out.push(await planNorm(ctx, model, layer.norm2, a.mid, a.n2, a.n2Stats, `${p}.norm2`));
  if (c.family === 'gpt2') {
    await lin('fc', a.n2, a.gate);
    out.push(await planGeluNewForward(ctx, { x: a.gate, y: a.act }, `${p}.gelu`));
  } else {
    await lin('gate', a.n2, a.gate);
    await lin('up', a.n2, a.up as Tensor);
    out.push(await planSiluMulForward(ctx, { gate: a.gate, up: a.up as Tensor, out: a.act }, `${p}.silu_mul`));
  }
  await lin('down', a.act, a.mlpOut);
  out.push(await planAddScaled(ctx, a.mid, a.mlpOut, a.out, 1, `${p}.residual2`));
  return out;
}

/** Plans the forward pass for batches of B sequences of T tokens. */
export async function planForward(ctx: GpuContext, model: CausalLM, opts: ForwardOptions): Promise<ForwardPlan> {
  const { B, T } = opts;
  const c = model.config;
  if (!Number.isSafeInteger(B) || B < 1 || !Number.isSafeInteger(T) || T < 1) {
    throw new ShapeError(`forward: batch ${B} × sequence ${T} must be positive integers`);
  }
  if (T > c.maxPositions) {
    throw new ShapeError(`forward: sequence length ${T} exceeds the model's max_position_embeddings ${c.maxPositions}`);
  }
  const mode = opts.mode ?? 'inference';
  const rows = B * T;
  const d = c.hiddenSize;
  const alloc = new Allocator(ctx, opts.label ?? 'forward');
  const dispatches: Dispatch[] = [];
  try {
    const ids = alloc.of([rows], 'i32', 'ids');
    const errors = alloc.of([2], 'u32', 'embedding_errors');
    const embedded = alloc.f32([rows, d], 'embedded');
    dispatches.push(
      ...(await planEmbeddingTable(
        ctx,
        { ids, table: model.embed, wpe: model.positions, out: embedded, errors },
        { T, label: 'embedding' },
      )),
    );
    const layers: LayerActivations[] = [];
    const layerDispatches: Dispatch[][] = [];
    const recompute = mode === 'train' && (opts.recompute ?? false);
    // Inference ping-pongs the residual stream between two buffers and shares everything else;
    // recomputing training keeps every layer's input but shares the rest.
    const pingPong = mode === 'inference' ? [embedded, alloc.f32([rows, d], 'residual')] : undefined;
    const share = mode === 'inference' || recompute;
    let shared: LayerActivations | undefined;
    const attention = batchedAttention(model, B, T);
    // LoRA dropout (training only): one scratch as wide as the widest adapted input.
    let dropout: DropoutState | undefined;
    const dropIn = [...(opts.lora?.values() ?? [])]
      .filter((w) => (w.dropout?.p ?? 0) > 0)
      .map((w) => w.a.shape[1] as number);
    if (mode === 'train' && dropIn.length > 0) {
      if (!opts.dropoutCounter) throw new ShapeError('forward: LoRA dropout needs a dropoutCounter');
      dropout = {
        counter: opts.dropoutCounter,
        scratch: alloc.f32([rows, Math.max(...dropIn)], 'lora_dropout'),
      };
    }
    let x = embedded;
    for (let i = 0; i < c.numLayers; i++) {
      const out = pingPong ? (pingPong[(i + 1) % 2] as Tensor) : alloc.f32([rows, d], `layer${i}.out`);
      const acts = allocateLayer(alloc, model, rows, B, T, i, x, out, opts.lora, shared);
      if (share) shared ??= acts;
      layers.push(acts);
      const planned = await planLayer(ctx, model, model.layers[i] as Layer, acts, attention, opts.lora, dropout);
      layerDispatches.push(planned);
      dispatches.push(...planned);
      x = out;
    }
    const hidden = alloc.f32([rows, d], 'hidden');
    const finalStats = normStats(alloc, rows, c.norm.kind === 'layer', 'final_norm');
    dispatches.push(await planNorm(ctx, model, model.finalNorm, x, hidden, finalStats, 'final_norm'));
    let logits: Tensor | undefined;
    if (opts.logits) {
      logits = alloc.f32([rows, c.vocabSize], 'logits');
      dispatches.push(...(await planTableProduct(ctx, hidden, model.lmHead, logits, 'lm_head', alloc.owned)));
    }
    return new ForwardPlan(
      model,
      B,
      T,
      mode,
      ids,
      embedded,
      layers,
      hidden,
      finalStats,
      logits,
      errors,
      dispatches,
      alloc.owned,
      layerDispatches,
      recompute,
      dropout,
    );
  } catch (e) {
    for (const dsp of dispatches) dsp.dispose();
    for (const t of alloc.owned) t.dispose();
    throw e;
  }
}
