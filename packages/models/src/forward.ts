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
  arenaLayout,
  attentionVariant,
  createTensor,
  type Dispatch,
  f16TileMathApplies,
  fusedQkvLayout,
  type GpuContext,
  LORA_DA_MAX_ROLES,
  LORA_H_MAX_RANK,
  type LoraDropout,
  loraHInMatmulPays,
  MATVEC_MAX_ROWS,
  type MatmulActivation,
  type MatmulOptions,
  type MatmulRope,
  normInMlpPays,
  planAttentionForward,
  planEmbeddingTable,
  planGeluNewForward,
  planLayerNormForward,
  planLoraForward,
  planLoraRowsMulti,
  planMatmul,
  planQkvMatmul,
  planRmsNormForward,
  planRopeForward,
  planSiluMulForward,
  planTableProduct,
  type QkvProjection,
  qkvInOnePays,
  type RmsNormLoraH,
  rmsnormLoraFits,
  ropeInMatmulPays,
  ShapeError,
  type Tensor,
  type TileMath,
  tensorView,
} from '@webtune/core';
import { type LinearModule, type LinearRole, modelLayout } from './architecture.js';
import type { ModelConfig } from './config.js';
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
  /**
   * Fused kernels where two steps can share a dispatch (RoPE of q and k together, ...). Default
   * true; false plans every step on its own, the plain path the fused one is checked against.
   */
  readonly fuse?: boolean;
  /**
   * The tiled products' math for projections of weights stored below f32 (f16TileMathApplies) and
   * for the tiled attention. 'f16' stages them in f16 (needs shader-f16):
   * projections multiply in f16 with f32 accumulation, an adapted projection's LoRA term (and h
   * where the projection forms it) stays f32, and attention multiplies its f16-staged rows in f32.
   * Default 'f32' here (evaluation computes its losses in f32); generation defaults to
   * inferenceTileMath and the trainer to trainingTileMath (f16 on GPUs with shader-f16), whose
   * logits stay within twice transformers' own f16 deviation from the f32 reference
   * (f16_tiles.test.ts) and whose LoRA gradients within f16's bounds of PEFT's (train_f16.test.ts).
   * In train mode the backward's attention kernels read q, k and v rounded to f16 as the forward
   * staged them (ForwardPlan.attentionTileMath), so the probabilities they recompute are the ones
   * whose log-sum-exp the forward saved.
   */
  readonly tileMath?: TileMath;
  /**
   * With `fuse`: the RMSNorm before an unadapted gated MLP inside the gate and up dispatch where
   * normInGatedMlp allows. Default normInMlpPays(ctx) (GPUs); tests set it to run it on any adapter.
   */
  readonly normInMlp?: boolean;
  /**
   * With `fuse`: LoRA's h formed inside its projection's matmul where loraHInMatmulRoles allows.
   * Default loraHInMatmulPays(ctx) (GPUs); tests set it to run it on any adapter.
   */
  readonly loraHInMatmul?: boolean;
  /**
   * With `fuse`: a layer's q, k and v projections in one dispatch where qkvInOne allows (which
   * needs RoPE in the projections' store, ropeInProjections, too). Default qkvInOnePays(ctx)
   * (GPUs); tests set it to run it on any adapter.
   */
  readonly qkvInOne?: boolean;
  /**
   * With `fuse`: RoPE in the q and k projections' store where ropeInProjections allows. Default
   * ropeInMatmulPays(ctx) (GPUs); tests set it to run it on any adapter.
   */
  readonly ropeInProjections?: boolean;
}

/**
 * Fusions that are the device's choice, each measured slower on the CPU adapters and so planned on
 * GPUs only (tests force them anywhere): the RMSNorm inside the gated MLP's dispatch
 * (normInGatedMlp), LoRA's h inside its projection's matmul (loraHInMatmulRoles), q, k and v
 * in one dispatch (qkvInOne) and RoPE in the q and k projections' store (ropeInProjections).
 */
export interface LayerFusions {
  readonly normInMlp: boolean;
  readonly loraHInMatmul: boolean;
  readonly qkvInOne: boolean;
  readonly ropeInProjections: boolean;
}

/** The device's fusions (normInMlpPays, loraHInMatmulPays, qkvInOnePays, ropeInMatmulPays), unless
 * `force` says otherwise. */
export function layerFusions(ctx: GpuContext, force: Partial<LayerFusions> = {}): LayerFusions {
  return {
    normInMlp: force.normInMlp ?? normInMlpPays(ctx),
    loraHInMatmul: force.loraHInMatmul ?? loraHInMatmulPays(ctx),
    qkvInOne: force.qkvInOne ?? qkvInOnePays(ctx),
    ropeInProjections: force.ropeInProjections ?? ropeInMatmulPays(ctx),
  };
}

/** All of them: what planLayer does on GPUs, and the dispatch counts' default. */
export const GPU_FUSIONS: LayerFusions = {
  normInMlp: true,
  loraHInMatmul: true,
  qkvInOne: true,
  ropeInProjections: true,
};

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
  /** x + o_proj(attn): norm1 copies x here and o_proj adds its output in (inference: x itself). */
  readonly mid: Tensor;
  readonly n2: Tensor;
  readonly n2Stats: NormStats;
  /** Llama family: gate and up [rows, I]; GPT-2: fc [rows, I] in `gate`. */
  readonly gate: Tensor;
  readonly up?: Tensor;
  /** silu(gate)·up, or gelu_new(fc). */
  readonly act: Tensor;
  /** mid + down(act), the next layer's x: norm2 copies mid here and down_proj adds its output in
   * (inference: x itself, the residual stream updated in place). */
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
    readonly dropout: DropoutState | undefined,
    /** Planned with fused kernels (ForwardOptions.fuse); the backward plans alike. */
    readonly fuse: boolean,
    /** The attention's tile math as it ran: 'f16' where the tiled forward staged q, k and v in f16,
     * which the backward's kernels then read rounded alike (AttentionForwardArgs.tileMath). */
    readonly attentionTileMath: TileMath = 'f32',
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

/** One f32 activation buffer of a layer's forward pass. */
export interface LayerBufferSpec {
  /** Its name in the layer ('n1', 'n1.rstd', 'q', 'gate', 'mid', ...). */
  readonly key: string;
  readonly shape: readonly number[];
  /**
   * Whether the backward reads it. A training plan keeps such a buffer per layer; all others
   * (used only inside the layer's own forward) are one buffer that every layer reuses.
   */
  readonly read: boolean;
}

/** Which of a layer's projections carry an adapter (their inputs are read by the backward). */
export type AdaptedRoles = ReadonlySet<LinearRole>;

/**
 * The activation buffers of one layer's forward pass, apart from the residual stream (x, out)
 * and LoRA's h: the single list planForward allocates from and estimateMemory counts.
 * `inPlace`: the residual stream is updated in place (inference), so there is no `mid`.
 */
export function layerBuffers(
  config: ModelConfig,
  rows: number,
  B: number,
  T: number,
  adapted: AdaptedRoles,
  inPlace: boolean,
): LayerBufferSpec[] {
  const c = config;
  const d = c.hiddenSize;
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const ln = c.norm.kind === 'layer';
  const gpt2 = c.family === 'gpt2';
  const has = (...roles: LinearRole[]) => roles.some((r) => adapted.has(r));
  const out: LayerBufferSpec[] = [];
  const add = (key: string, shape: number[], read: boolean, when = true) => {
    if (when) out.push({ key, shape, read });
  };
  // A norm's output is read back only by its projections' LoRA gradients (dA = gᵀ·x).
  add('n1', [rows, d], has('q', 'k', 'v', 'qkv'));
  add('n1.rstd', [rows], true);
  add('n1.mean', [rows], true, ln);
  add('q', [rows, qDim], true, !gpt2);
  add('k', [rows, kvDim], true, !gpt2);
  add('v', [rows, kvDim], true, !gpt2);
  add('q_raw', [rows, qDim], true, c.qkNorm);
  add('k_raw', [rows, kvDim], true, c.qkNorm);
  add('q_norm.rstd', [rows * c.numHeads], true, c.qkNorm);
  add('k_norm.rstd', [rows * c.numKvHeads], true, c.qkNorm);
  add('qkv', [rows, 3 * d], true, gpt2);
  add('attn', [rows, qDim], true);
  add('lse', [B, c.numHeads, T], true);
  add('mid', [rows, d], true, !inPlace);
  add('n2', [rows, d], has('gate', 'up', 'fc'));
  add('n2.rstd', [rows], true);
  add('n2.mean', [rows], true, ln);
  add(gpt2 ? 'fc' : 'gate', [rows, I], true);
  add('up', [rows, I], true, !gpt2);
  add('act', [rows, I], has('down'));
  return out;
}

/** LoRA's rank per adapted module of a model (module name -> r). */
export type AdapterRanks = ReadonlyMap<string, number>;

export function adapterRanks(lora: LoraWeightsByModule | undefined): AdapterRanks {
  return new Map([...(lora ?? [])].map(([name, w]) => [name, w.a.shape[0] as number]));
}

/** A layer's adapted projections and their ranks. */
export function adaptedRoles(
  layer: { linears: readonly LinearModule[] },
  ranks: AdapterRanks,
): Map<LinearRole, number> {
  const roles = new Map<LinearRole, number>();
  for (const m of layer.linears) {
    const r = ranks.get(m.name);
    if (r !== undefined) roles.set(m.role, r);
  }
  return roles;
}

/** A buffer a plan allocates (its label without the plan's prefix). */
export interface PlannedBuffer {
  readonly label: string;
  readonly shape: readonly number[];
  readonly dtype: 'f32' | 'i32' | 'u32';
  /** An arena (f32): these tensors are places in it (at arenaLayout's offsets for
   * PLACE_ALIGNMENT), each gettable by its own label. */
  readonly places?: readonly { readonly label: string; readonly shape: readonly number[] }[];
}

/** Where a planned arena's places start: a multiple of every device's
 * minStorageBufferOffsetAlignment (at most 256 by WebGPU's rules), so the layout, and with it the
 * memory estimate, is the same on every device. */
export const PLACE_ALIGNMENT = 256;

/** A planned f32 arena holding these places (labels and shapes) at arenaLayout's offsets. */
export function plannedArena(
  label: string,
  places: readonly { readonly label: string; readonly shape: readonly number[] }[],
): PlannedBuffer {
  const { elements } = arenaLayout(
    places.map((p) => p.shape),
    PLACE_ALIGNMENT,
  );
  return { label, shape: [elements], dtype: 'f32', places };
}

/** Views of a planned arena's places in `t`, the tensor allocated for it: [place label, view],
 * each view labelled `${prefix}.${place label}`. */
export function placeViews(t: Tensor, arena: PlannedBuffer, prefix: string): [string, Tensor][] {
  const places = arena.places ?? [];
  const { offsets } = arenaLayout(
    places.map((p) => p.shape),
    PLACE_ALIGNMENT,
  );
  return places.map((p, i) => [
    p.label,
    tensorView(t, offsets[i] as number, [...p.shape], 'f32', `${prefix}.${p.label}`),
  ]);
}

/** The parts of a layer that forwardLayout places in one buffer. */
const QKV_PLACES: readonly string[] = ['q', 'k', 'v'];

/** The saved input of an adapted projection, which its dA = s·gᵀ·x reads (layerBuffers' key). */
export type LoraInputKey = 'n1' | 'attn' | 'n2' | 'act';

export function loraInputKey(role: LinearRole): LoraInputKey {
  switch (role) {
    case 'q':
    case 'k':
    case 'v':
    case 'qkv':
      return 'n1';
    case 'o':
      return 'attn';
    case 'gate':
    case 'up':
    case 'fc':
      return 'n2';
    case 'down':
      return 'act';
  }
}

/** The inputs that may share an arena: no forward dispatch reads one of a group and writes another
 * (WebGPU forbids a buffer bound read-only and writable in one dispatch), which the MLP's up (or fc)
 * projection would, reading n2 and storing act through its epilogue. */
const LORA_INPUT_GROUPS: readonly (readonly LoraInputKey[])[] = [['n1', 'attn', 'n2'], ['act']];

/** The largest arena of dA inputs (lora_x{c}): WebGPU's default maxStorageBufferBindingSize, which
 * every device binds (planLoraDaMany binds the arena whole). */
export const LORA_DA_ARENA_BYTES = 128 * 1024 * 1024;

/** A chunk of loraDaChunks: layers (ascending) whose projections reading `keys` have their dA in
 * one dispatch. */
export interface LoraDaChunk {
  readonly keys: readonly LoraInputKey[];
  readonly layers: readonly number[];
  /** Its modules, layer by layer: the adapted projections of its layers that read `keys`. */
  readonly modules: readonly { readonly layer: number; readonly role: LinearRole; readonly r: number }[];
}

/**
 * The chunks of layers whose LoRA dA the training backward leaves until it has passed the chunk,
 * and then forms in one dispatch (planLoraDaMany) instead of one per adapted projection (or
 * shared-input group) per layer. Per group of inputs (LORA_INPUT_GROUPS: n1, attn and n2; act):
 * consecutive layers with projections adapted that read them, as many as fit LORA_DA_ARENA_BYTES of
 * those inputs (each at PLACE_ALIGNMENT), as much of their g, and LORA_DA_MAX_ROLES projections; a
 * layer whose inputs or g alone are larger is in no chunk and keeps its dA dispatches. Where training keeps every layer's
 * activations (no recomputation), forwardLayout makes each chunk's inputs places of one arena,
 * `lora_x{c}`; the backward defers where loraDaDeferred.
 */
export function loraDaChunks(config: ModelConfig, ranks: AdapterRanks, rows: number): LoraDaChunk[] {
  const c = config;
  const width = { n1: c.hiddenSize, attn: c.numHeads * c.headDim, n2: c.hiddenSize, act: c.intermediateSize };
  const chunks: LoraDaChunk[] = [];
  for (const group of LORA_INPUT_GROUPS) {
    let layers: number[] = [];
    let modules: { layer: number; role: LinearRole; r: number }[] = [];
    let bytes = 0;
    let gBytes = 0;
    let roles = 0;
    const close = () => {
      if (layers.length > 0) chunks.push({ keys: group, layers, modules });
      layers = [];
      modules = [];
      bytes = 0;
      gBytes = 0;
      roles = 0;
    };
    const placed = (elements: number) => Math.ceil((elements * 4) / PLACE_ALIGNMENT) * PLACE_ALIGNMENT;
    modelLayout(c).layers.forEach((l, i) => {
      const adapted = [...adaptedRoles(l, ranks)].filter(([role]) => group.includes(loraInputKey(role)));
      if (adapted.length === 0) return;
      const keys = new Set(adapted.map(([role]) => loraInputKey(role)));
      const own = [...keys].reduce((n, key) => n + placed(rows * width[key]), 0);
      // Their g stay until the chunk's dispatch: places of one arena too (backwardLayout's lora_g_da).
      const g = adapted.reduce((n, [, r]) => n + placed(rows * r), 0);
      const limit = LORA_DA_ARENA_BYTES;
      if (own > limit || g > limit || adapted.length > LORA_DA_MAX_ROLES) {
        close();
        return;
      }
      if (bytes + own > limit || gBytes + g > limit || roles + adapted.length > LORA_DA_MAX_ROLES) close();
      layers.push(i);
      for (const [role, r] of adapted) modules.push({ layer: i, role, r });
      bytes += own;
      gBytes += g;
      roles += adapted.length;
    });
    close();
  }
  return chunks;
}

/** The chunk (index in loraDaChunks) whose dispatch takes the dA of layer i's projections reading
 * `key`, per layer and key. */
export function loraDaChunkOf(
  chunks: readonly LoraDaChunk[],
): (layer: number, key: LoraInputKey) => number | undefined {
  const at = new Map<string, number>();
  chunks.forEach((chunk, ci) => {
    for (const i of chunk.layers) for (const key of chunk.keys) at.set(`${i}.${key}`, ci);
  });
  return (layer, key) => at.get(`${layer}.${key}`);
}

/** Whether the training backward leaves the LoRA dA of loraDaChunks' layers to one dispatch per
 * chunk: fused, no LoRA dropout (its dA reads the masked input, a scratch), no recomputation (the
 * inputs must outlive the backward of their layer). */
export function loraDaDeferred(fuse: boolean, dropout: boolean, recompute: boolean): boolean {
  return fuse && !dropout && !recompute;
}

/** Every buffer of a forward plan, and per layer which buffer plays each part. */
export interface ForwardLayout {
  readonly buffers: readonly PlannedBuffer[];
  /** Per layer: key ('x', 'mid', 'out', 'n1', ..., 'lora_h.q') -> label in `buffers`. */
  readonly layers: readonly ReadonlyMap<string, string>[];
}

/**
 * The buffers planForward allocates for (B, T, mode): the single description of the forward's
 * memory, which estimateMemory sums as well. Training keeps, per layer, its input and what the
 * backward reads (layerBuffers' `read`); with `recompute` only the input and LoRA's h, the rest
 * being one shared set recomputed in the backward. Inference shares everything and updates one
 * residual stream in place.
 */
export function forwardLayout(
  config: ModelConfig,
  ranks: AdapterRanks,
  opts: {
    B: number;
    T: number;
    mode?: 'inference' | 'train';
    recompute?: boolean;
    logits?: boolean;
    /** Training with LoRA dropout: the widest adapted input (the masked input's scratch). */
    dropoutWidth?: number;
  },
): ForwardLayout {
  const { B, T } = opts;
  const c = config;
  const rows = B * T;
  const d = c.hiddenSize;
  const train = (opts.mode ?? 'inference') === 'train';
  const keepAll = train && !(opts.recompute ?? false);
  const buffers: PlannedBuffer[] = [];
  const seen = new Set<string>();
  const buffer = (label: string, shape: readonly number[], dtype: PlannedBuffer['dtype'] = 'f32') => {
    if (!seen.has(label)) {
      seen.add(label);
      buffers.push({ label, shape, dtype });
    }
    return label;
  };
  // An f32 buffer of places (labels and shapes), each at arenaLayout's offset.
  const arena = (label: string, places: readonly { label: string; shape: readonly number[] }[]) => {
    if (!seen.has(label)) {
      seen.add(label);
      buffers.push(plannedArena(label, places));
    }
  };
  buffer('ids', [rows], 'i32');
  buffer('embedding_errors', [2], 'u32');
  let x = buffer('embedded', [rows, d]);
  // Training that keeps every layer: the inputs of each chunk's adapted projections, places of one
  // arena (loraDaChunks), so that one dispatch forms all their dA.
  const daChunk = loraDaChunkOf(keepAll ? loraDaChunks(c, ranks, rows) : []);
  const daPlaces: { label: string; shape: readonly number[] }[][] = [];
  const layers = modelLayout(c).layers.map((l, i) => {
    const roles = adaptedRoles(l, ranks);
    const parts = new Map<string, string>();
    parts.set('x', x);
    const specs = layerBuffers(c, rows, B, T, new Set(roles.keys()), !train);
    const prefix = (spec: LayerBufferSpec) => (keepAll && spec.read ? `layer${i}.` : 'layer.');
    const daKeys = new Set([...roles.keys()].map(loraInputKey));
    for (const spec of specs) {
      const key = spec.key as LoraInputKey;
      const ci = daKeys.has(key) ? daChunk(i, key) : undefined;
      if (ci !== undefined) {
        const label = `layer${i}.${key}`;
        daPlaces[ci] = [...(daPlaces[ci] ?? []), { label, shape: spec.shape }];
        parts.set(key, label);
      } else if (!QKV_PLACES.includes(spec.key)) parts.set(spec.key, buffer(`${prefix(spec)}${spec.key}`, spec.shape));
    }
    // q, k and v are places of one buffer (matmul_qkv writes all three), as are LoRA's h of the
    // layer (matmul_qkv reads those of q, k and v through one binding).
    const qkv = specs.filter((spec) => QKV_PLACES.includes(spec.key));
    if (qkv.length > 0) {
      const at = prefix(qkv[0] as LayerBufferSpec);
      arena(
        `${at}qkv`,
        qkv.map((spec) => ({ label: `${at}${spec.key}`, shape: spec.shape })),
      );
      for (const spec of qkv) parts.set(spec.key, `${at}${spec.key}`);
    }
    if (roles.size > 0)
      arena(
        `layer${i}.lora_h`,
        [...roles].map(([role, r]) => ({ label: `layer${i}.${role}.lora_h`, shape: [rows, r] })),
      );
    for (const role of roles.keys()) parts.set(`lora_h.${role}`, `layer${i}.${role}.lora_h`);
    if (!train) parts.set('mid', x);
    const out = train ? buffer(`layer${i}.out`, [rows, d]) : x;
    parts.set('out', out);
    x = out;
    return parts;
  });
  for (const [ci, places] of daPlaces.entries()) arena(`lora_x${ci}`, places);
  // LoRA dropout: one scratch shared by every adapted module (each uses it at once, and again in
  // its backward).
  if (train && (opts.dropoutWidth ?? 0) > 0) buffer('lora_dropout', [rows, opts.dropoutWidth as number]);
  buffer('hidden', [rows, d]);
  buffer('final_norm.rstd', [rows]);
  if (c.norm.kind === 'layer') buffer('final_norm.mean', [rows]);
  if (opts.logits) buffer('logits', [rows, c.vocabSize]);
  return { buffers, layers };
}

/**
 * Projections that read the same input: with fused kernels and no LoRA dropout, the LoRA h of
 * every adapted one is one dispatch (lora_rows_multi), their g and dB two modules to a dispatch
 * (lora_g_db_pair) and their dA one more (lora_cols_multi).
 */
export function sharedInputGroups(config: ModelConfig): readonly (readonly LinearRole[])[] {
  return config.family === 'gpt2'
    ? []
    : [
        ['q', 'k', 'v'],
        ['gate', 'up'],
      ];
}

/** The adapted projections of each shared-input group whose LoRA products share dispatches (two
 * or more of them, fused kernels, no dropout). */
export function sharedLoraGroups(
  config: ModelConfig,
  adapted: AdaptedRoles,
  dropout: boolean,
  fuse: boolean,
): LinearRole[][] {
  if (!fuse || dropout) return [];
  return sharedInputGroups(config)
    .map((g) => g.filter((role) => adapted.has(role)))
    .filter((g) => g.length >= 2);
}

/** One dispatch of projections that read the same input: a projection's, and another's beside it. */
export interface ProjectionStep {
  readonly role: LinearRole;
  readonly extra?: LinearRole;
}

/**
 * The dispatches of projections that read one input (`roles`, in order), forward (q, k, v: planMatmul's
 * `second`) or backward (their dx: its `extra`). `pair`: each adapted projection's dispatch, whose
 * low-rank slot holds its LoRA term, also carries one unadapted projection that `fits` beside it,
 * and the unadapted rest go two to a dispatch where they fit. Otherwise one dispatch each.
 */
export function projectionSteps(
  roles: readonly LinearRole[],
  adapted: AdaptedRoles,
  pair: boolean,
  fits: (a: LinearRole, b: LinearRole) => boolean = () => true,
): ProjectionStep[] {
  if (!pair) return roles.map((role) => ({ role }));
  const free = roles.filter((r) => !adapted.has(r));
  const take = (role: LinearRole) => {
    const i = free.findIndex((r) => fits(role, r));
    return i < 0 ? undefined : free.splice(i, 1)[0];
  };
  const steps: ProjectionStep[] = roles.filter((r) => adapted.has(r)).map((role) => ({ role, extra: take(role) }));
  for (let role = free.shift(); role !== undefined; role = free.shift()) steps.push({ role, extra: take(role) });
  return steps;
}

/** The forward's q, k and v dispatches: two to one where they can be (projectionSteps), that is,
 * with fused kernels and no bias on them (matmul_pair has none), between projections of the same
 * output width (k and v; q too without grouped heads). */
export function qkvSteps(config: ModelConfig, adapted: AdaptedRoles, fuse: boolean): ProjectionStep[] {
  const width = (role: LinearRole) => (role === 'q' ? config.numHeads : config.numKvHeads);
  const pair = fuse && config.family !== 'gpt2' && !config.qkvBias;
  return projectionSteps(['q', 'k', 'v'], adapted, pair, (a, b) => width(a) === width(b));
}

/**
 * Whether a layer's gate and up projections, and silu(gate)·up, are one dispatch (planMatmul's
 * `glu`): fused kernels, the gated MLP without bias, neither projection adapted.
 */
export function gatedMlpFused(config: ModelConfig, adapted: AdaptedRoles, fuse: boolean): boolean {
  return fuse && config.family !== 'gpt2' && !config.mlpBias && !adapted.has('gate') && !adapted.has('up');
}

/**
 * Whether the fused forward computes the RMSNorm before the gated MLP inside the gate and up
 * dispatch (planMatmul's `norm`, matmul_glu_norm) instead of a dispatch of its own: the MLP fused
 * (gatedMlpFused), an RMSNorm, more than MATVEC_MAX_ROWS rows (the tiled kernel; the decode step
 * keeps its norm dispatch), and, where the block's output is not the residual stream itself
 * (training keeps mid for the backward), an unadapted down projection, which then adds mid as it
 * stores (matmul_resid) since no norm dispatch copied it to the output first.
 */
export function normInGatedMlp(
  config: ModelConfig,
  adapted: AdaptedRoles,
  fuse: boolean,
  rows: number,
  inPlace: boolean,
  pays = true,
): boolean {
  return (
    pays &&
    gatedMlpFused(config, adapted, fuse) &&
    config.norm.kind === 'rms' &&
    rows > MATVEC_MAX_ROWS &&
    (inPlace || !adapted.has('down'))
  );
}

/**
 * The adapted projections of a layer that form LoRA's h inside their own matmul (planLoraForward's
 * hInMatmul, matmul_lora_h) instead of in a thin dispatch before it: where `pays`
 * (loraHInMatmulPays: GPUs), with fused kernels, no dropout, the tiled kernel (more than
 * MATVEC_MAX_ROWS rows) and ranks up to LORA_H_MAX_RANK, projections whose product has no epilogue
 * but bias, accumulation and RoPE (o, down, GPT-2's qkv, a gate without its up, q, k and v unless
 * one carries an unadapted neighbour's product). A shared-input group takes it only as a whole,
 * and not where the norm before it computes the group's h anyway (two or three projections after
 * an RMSNorm): it then saves the group's h dispatch. Nor q, k and v where they are one dispatch
 * (`qkvOne`: qkvInOne), which takes their h from the group's dispatch.
 */
export function loraHInMatmulRoles(
  config: ModelConfig,
  ranks: ReadonlyMap<LinearRole, number>,
  rows: number,
  dropout: boolean,
  fuse: boolean,
  pays: boolean,
  qkvOne = false,
  normH = true,
): Set<LinearRole> {
  if (!pays || !fuse || dropout || rows <= MATVEC_MAX_ROWS) return new Set();
  const adapted = new Set(ranks.keys());
  const paired = new Set(
    qkvSteps(config, adapted, fuse)
      .filter((s) => s.extra)
      .map((s) => s.role),
  );
  const plain: readonly LinearRole[] = ['o', 'down', 'qkv', 'gate', 'q', 'k', 'v'];
  const eligible = (role: LinearRole) =>
    plain.includes(role) && !paired.has(role) && (ranks.get(role) ?? Infinity) <= LORA_H_MAX_RANK;
  const out = new Set([...adapted].filter(eligible));
  for (const g of sharedLoraGroups(config, adapted, dropout, fuse)) {
    if ((normH && hInNorm(config, g)) || !g.every(eligible)) for (const role of g) out.delete(role);
  }
  if (qkvOne) for (const role of ['q', 'k', 'v'] as const) out.delete(role);
  return out;
}

/** Whether the norm before a shared-input group computes its h (rmsnorm_fwd_lora: two or three
 * projections after an RMSNorm, their A places in the trainer's arena, their h in the layer's). */
function hInNorm(config: ModelConfig, group: readonly LinearRole[]): boolean {
  return group.length >= 2 && group.length <= 3 && config.norm.kind === 'rms';
}

/**
 * Whether the fused forward rotates q and k by RoPE in the projections' store (planMatmul's
 * `rope`) instead of a dispatch of its own: where the device plans it (fusions.ropeInProjections,
 * ropeInMatmulPays: GPUs), separate q and k with RoPE, no per-head norm between
 * projection and rotation (Qwen3's), head sizes that are multiples of 4. planProjections also
 * needs positions pos0 + row % T and no KV cache to write (training, evaluation); generation keeps
 * its RoPE dispatch, which writes the cache.
 */
export function ropeInProjections(config: ModelConfig, fuse: boolean, fusions: LayerFusions): boolean {
  return (
    fuse &&
    fusions.ropeInProjections &&
    config.family !== 'gpt2' &&
    config.rope !== undefined &&
    !config.qkNorm &&
    config.headDim % 4 === 0
  );
}

/**
 * Whether the fused forward computes a layer's q, k and v in one dispatch (planQkvMatmul) where
 * the device plans it (fusions.qkvInOne, qkvInOnePays: GPUs): RoPE in the projections' store (ropeInProjections, which planLayer
 * also needs positions pos0 + row % T and no KV cache for), no bias on them (Qwen2's), the tiled
 * kernel (more than MATVEC_MAX_ROWS rows), and none of them adapted, or two or three without
 * LoRA dropout, whose h the shared-input group then computes before them (sharedLoraGroups: the
 * RMSNorm's dispatch, rmsnorm_fwd_lora, where their A and h lie in arenas; else lora_rows_multi;
 * they would otherwise form their own in their matmuls, loraHInMatmulRoles) and whose h and B are places of one buffer each,
 * as the trainer keeps them (planLayer falls back to qkvSteps' dispatches otherwise). A lone
 * adapted one keeps its dispatches: its h in its matmul and k beside v are two already.
 */
export function qkvInOne(
  config: ModelConfig,
  ranks: ReadonlyMap<LinearRole, number>,
  rows: number,
  dropout: boolean,
  fuse: boolean,
  fusions: LayerFusions,
): boolean {
  if (!fusions.qkvInOne || !ropeInProjections(config, fuse, fusions) || config.qkvBias || rows <= MATVEC_MAX_ROWS)
    return false;
  const lora = (['q', 'k', 'v'] as const).filter((role) => ranks.has(role)).length;
  return lora === 0 || (lora >= 2 && !dropout);
}

/** Dispatches of one layer's training forward over `rows` rows (planLayer with batchedAttention). */
export function layerDispatchCount(
  config: ModelConfig,
  ranks: ReadonlyMap<LinearRole, number>,
  rows: number,
  dropout = false,
  fuse = true,
  fusions: LayerFusions = GPU_FUSIONS,
): number {
  const c = config;
  const adapted = new Set(ranks.keys());
  // LoRA: (mask,) h, then y; y alone where h is formed in it.
  const qkvOne = qkvInOne(c, ranks, rows, dropout, fuse, fusions);
  const hIn = loraHInMatmulRoles(c, ranks, rows, dropout, fuse, fusions.loraHInMatmul, qkvOne);
  const lin = (role: LinearRole) => (adapted.has(role) ? (dropout ? 3 : hIn.has(role) ? 1 : 2) : 1);
  // The two norms (the second inside the gated MLP's dispatch where normInGatedMlp), attention.
  let n = (normInGatedMlp(c, adapted, fuse, rows, false, fusions.normInMlp) ? 1 : 2) + 1;
  // A group's h are one dispatch instead of one each; none when the RMSNorm before the group
  // computes the h of its projections (their A and h in arenas, as the trainer keeps them), or when
  // each forms its own in its matmul.
  for (const g of sharedLoraGroups(c, adapted, dropout, fuse))
    if (!g.every((role) => hIn.has(role))) n -= g.length - 1 + (hInNorm(c, g) ? 1 : 0);
  // q and k in one dispatch, or one each; none when the projections rotate them.
  const rope = ropeInProjections(c, fuse, fusions) ? 0 : fuse ? 1 : 2;
  const act = fuse ? 0 : 1; // gelu or silu·mul: the fc or up projection's epilogue when fused
  if (c.family === 'gpt2') n += lin('qkv') + lin('fc') + act;
  else {
    const mlp = gatedMlpFused(c, adapted, fuse) ? 1 : lin('gate') + lin('up') + act;
    // One dispatch for q, k and v (and the h dispatches of adapted ones, which the group's
    // correction above takes off again), or qkvSteps'.
    const projections = qkvOne
      ? (['q', 'k', 'v'] as const).reduce((m, role) => m + (adapted.has(role) ? lin(role) - 1 : 0), 1)
      : qkvSteps(c, adapted, fuse).reduce((m, s) => m + (adapted.has(s.role) ? lin(s.role) : 1), 0);
    n += projections + rope + (c.qkNorm ? 2 : 0) + mlp;
  }
  return n + lin('o') + lin('down');
}

/** Dispatches of planForward's plan: the embedding (one per part of a split table), every layer,
 * the final norm (and the logits, one per part of a split LM head). */
export function forwardDispatchCount(
  config: ModelConfig,
  ranks: AdapterRanks,
  rows: number,
  opts: {
    logits?: boolean;
    dropout?: boolean;
    embedParts?: number;
    headParts?: number;
    fuse?: boolean;
    /** The device's fusions (layerFusions). Default GPU_FUSIONS. */
    fusions?: LayerFusions;
  } = {},
): number {
  let n = (opts.embedParts ?? 1) + 1 + (opts.logits ? (opts.headParts ?? 1) : 0);
  for (const l of modelLayout(config).layers)
    n += layerDispatchCount(config, adaptedRoles(l, ranks), rows, opts.dropout, opts.fuse, opts.fusions);
  return n;
}

/** Builds a layer's activations from its parts (see forwardLayout). */
function layerActivations(parts: ReadonlyMap<string, string>, get: (label: string) => Tensor): LayerActivations {
  const t = (key: string) => {
    const label = parts.get(key);
    return label === undefined ? undefined : get(label);
  };
  const must = (key: string) => {
    const v = t(key);
    if (!v) throw new Error(`forward layout has no ${key}`);
    return v;
  };
  const stats = (key: string): NormStats => ({ rstd: must(`${key}.rstd`), mean: t(`${key}.mean`) });
  const loraH = new Map<LinearRole, Tensor>();
  for (const key of parts.keys()) {
    if (key.startsWith('lora_h.')) loraH.set(key.slice('lora_h.'.length) as LinearRole, must(key));
  }
  const qRaw = t('q_raw');
  return {
    x: must('x'),
    n1: must('n1'),
    n1Stats: stats('n1'),
    q: t('q'),
    k: t('k'),
    v: t('v'),
    qRaw,
    kRaw: t('k_raw'),
    qNormStats: qRaw ? stats('q_norm') : undefined,
    kNormStats: qRaw ? stats('k_norm') : undefined,
    qkv: t('qkv'),
    attn: must('attn'),
    lse: must('lse'),
    mid: must('mid'),
    n2: must('n2'),
    n2Stats: stats('n2'),
    gate: t('gate') ?? must('fc'),
    up: t('up'),
    act: must('act'),
    out: must('out'),
    loraH,
  };
}

/**
 * Allocates the layer activations of a one-off inference plan (generation's prefill and decode
 * step): the residual stream `x` is updated in place; everything but LoRA's h comes from `pool`,
 * shared by all layers.
 */
export function allocateLayer(
  alloc: Allocator,
  model: CausalLM,
  rows: number,
  B: number,
  T: number,
  layerIndex: number,
  x: Tensor,
  lora: LoraWeightsByModule | undefined,
  pool: Map<string, Tensor>,
): LayerActivations {
  const c = model.config;
  const layout = modelLayout(c).layers[layerIndex];
  if (!layout) throw new Error(`no layer ${layerIndex}`);
  const roles = adaptedRoles(layout, adapterRanks(lora));
  const labels = new Map<string, Tensor>();
  const parts = new Map<string, string>([
    ['x', 'x'],
    ['mid', 'x'],
    ['out', 'x'],
  ]);
  labels.set('x', x);
  for (const spec of layerBuffers(c, rows, B, T, new Set(roles.keys()), true)) {
    let t = pool.get(spec.key);
    if (!t) {
      t = alloc.f32([...spec.shape], `layer.${spec.key}`);
      pool.set(spec.key, t);
    }
    parts.set(spec.key, spec.key);
    labels.set(spec.key, t);
  }
  for (const [role, r] of roles) {
    const key = `lora_h.${role}`;
    parts.set(key, key);
    labels.set(key, alloc.f32([rows, r], `layer${layerIndex}.${role}.lora_h`));
  }
  return layerActivations(parts, (label) => labels.get(label) as Tensor);
}

/** The norm of a block's input; with `xCopy`, also copies x there (the block's residual add). */
export async function planNorm(
  ctx: GpuContext,
  model: CausalLM,
  norm: Norm,
  x: Tensor,
  y: Tensor,
  stats: NormStats,
  label: string,
  xCopy?: Tensor,
): Promise<Dispatch> {
  const eps = model.config.norm.eps;
  if (model.config.norm.kind === 'layer') {
    return planLayerNormForward(
      ctx,
      { x, w: norm.w, b: norm.b, y, mean: stats.mean as Tensor, rstd: stats.rstd, xCopy },
      { eps, label },
    );
  }
  return planRmsNormForward(ctx, { x, w: norm.w, y, rstd: stats.rstd, xCopy }, { eps, label });
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

/** Where an adapted projection's LoRA h comes from: a thin dispatch before its matmul, that matmul
 * itself (matmul_lora_h), or already computed (a shared-input group's one dispatch). */
export type LoraHSource = 'dispatch' | 'in_matmul' | 'computed';

/** y (+)= x·Wᵀ + bias, or the fused LoRA form when the module has an adapter; `accumulate` adds
 * into y (the residual stream); `hSource`: where LoRA's h comes from; `activation`: y is stored
 * through the MLP's nonlinearity too; `second`: another (unadapted) projection of x in the same
 * dispatch. */
export async function planLinear(
  ctx: GpuContext,
  lin: Linear,
  x: Tensor,
  y: Tensor,
  lora: LoraModuleWeights | undefined,
  h: Tensor | undefined,
  accumulate = false,
  dropout?: DropoutState,
  hSource: LoraHSource = 'dispatch',
  activation?: MatmulActivation,
  second?: { readonly w: Tensor; readonly out: Tensor },
  tileMath: TileMath = 'f32',
  rope?: MatmulRope,
): Promise<Dispatch[]> {
  const label = lin.module.name;
  if (lora) {
    if (!h) throw new Error(`${label}: LoRA forward needs its h buffer`);
    const d = loraDropout(lora, dropout, x);
    return planLoraForward(
      ctx,
      { w0: lin.w, a: lora.a, b: lora.b, bias: lin.bias, scale: lora.scale },
      {
        ...{ x, y, h, accumulate, activation, second, rope },
        hComputed: hSource === 'computed',
        hInMatmul: hSource === 'in_matmul',
        ...(d ? { dropout: d } : {}),
        tileMath: tilesFor(ctx, tileMath, lin.w, { activation, second }),
      },
      label,
    );
  }
  const opts = { bias: lin.bias, beta: accumulate ? 1 : 0, activation, second, rope, label };
  return [await planMatmul(ctx, x, lin.w, y, { ...opts, tileMath: tilesFor(ctx, tileMath, lin.w, opts) })];
}

/** `wanted` where f16 tiles suit the product (f16TileMathApplies), else f32. */
function tilesFor(ctx: GpuContext, wanted: TileMath, w: Tensor, opts: MatmulOptions): TileMath {
  return wanted === 'f16' && f16TileMathApplies(ctx, w, opts) ? 'f16' : 'f32';
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
  /**
   * Decoding with separate k and v: the KV cache of each layer, which a fused plan's RoPE
   * dispatch writes the new rows into (rope_fwd_cache) in place of afterProjections' copies.
   */
  readonly kvCache?: {
    readonly k: (layer: number) => Tensor;
    readonly v: (layer: number) => Tensor;
    readonly maxRow: number;
  };
  readonly attend: (
    a: LayerActivations,
    layer: number,
    dest: QkvDestination,
  ) => Omit<AttentionForwardArgs, 'o' | 'lse'>;
  /** Receives each layer's planned attention dispatches (generation moves them along per token). */
  readonly onPlanned?: (layer: number, attention: readonly Dispatch[]) => void;
}

type Lin = (
  role: LinearRole,
  x: Tensor,
  y: Tensor,
  accumulate?: boolean,
  activation?: MatmulActivation,
  second?: { readonly w: Tensor; readonly out: Tensor },
  rope?: MatmulRope,
) => Promise<void>;

async function planProjections(
  ctx: GpuContext,
  model: CausalLM,
  layer: Layer,
  a: LayerActivations,
  dest: QkvDestination,
  pos: Positions,
  lin: Lin,
  out: Dispatch[],
  fuse: boolean,
  fusions: LayerFusions,
  kvCache?: { readonly k: Tensor; readonly v: Tensor; readonly maxRow: number },
): Promise<void> {
  const c = model.config;
  const p = `layer${layer.index}`;
  if ('qkv' in dest) {
    await lin('qkv', a.n1, dest.qkv);
    return;
  }
  // Two to a dispatch where they can be (projectionSteps).
  const outputs = new Map<LinearRole, Tensor>([
    ['q', a.qRaw ?? dest.q],
    ['k', a.kRaw ?? dest.k],
    ['v', dest.v],
  ]);
  // RoPE in the q and k projections' store (planMatmul's `rope`), where positions are pos0 + row % T.
  const ropeStore = ropeInProjections(c, fuse, fusions) && !pos.positions && !kvCache;
  const rotates = (role: LinearRole | undefined) => role === 'q' || role === 'k';
  for (const step of qkvSteps(c, new Set(a.loraH.keys()), fuse)) {
    const second = step.extra && {
      w: (layer.linears[step.extra] as Linear).w,
      out: outputs.get(step.extra) as Tensor,
    };
    const rope: MatmulRope | undefined =
      ropeStore && (rotates(step.role) || rotates(step.extra))
        ? {
            invFreq: model.ropeInvFreq as Tensor,
            headDim: c.headDim,
            T: pos.T,
            pos0: pos.pos0 ?? 0,
            scaling: model.ropeAttentionScaling,
            c: rotates(step.role),
            second: rotates(step.extra),
          }
        : undefined;
    await lin(step.role, a.n1, outputs.get(step.role) as Tensor, false, undefined, second, rope);
  }
  if (ropeStore) return;
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
  if (fuse) {
    const k = { x: dest.k, nHeads: c.numKvHeads };
    const cache = kvCache ? { v: dest.v, k: kvCache.k, vCache: kvCache.v, maxRow: kvCache.maxRow } : undefined;
    out.push(
      await planRopeForward(ctx, dest.q, invFreq, {
        ...rope,
        nHeads: c.numHeads,
        with: k,
        ...(cache ? { cache } : {}),
        label: `${p}.rope`,
      }),
    );
    return;
  }
  out.push(
    await planRopeForward(ctx, dest.q, invFreq, { ...rope, nHeads: c.numHeads, label: `${p}.rope_q` }),
    await planRopeForward(ctx, dest.k, invFreq, { ...rope, nHeads: c.numKvHeads, label: `${p}.rope_k` }),
  );
}

/** Whether q, k and v, the adapted ones' h and their B are places of one buffer each, as
 * planQkvMatmul binds them: planForward's layout with the trainer's arena; not generation's KV
 * cache views or a caller's own LoRA tensors. */
function qkvPlacesFit(
  layer: Layer,
  a: LayerActivations,
  dest: { readonly q: Tensor; readonly k: Tensor; readonly v: Tensor },
  lora: LoraWeightsByModule | undefined,
): boolean {
  const oneBuffer = (ts: readonly Tensor[]) => ts.every((t) => t.buffer === ts[0]?.buffer);
  const adapted = (['q', 'k', 'v'] as const).flatMap((role) => {
    const w = lora?.get(linear(layer, role).module.name);
    const h = a.loraH.get(role);
    return w && h ? [{ h, b: w.b }] : [];
  });
  return (
    oneBuffer([dest.q, dest.k, dest.v]) && oneBuffer(adapted.map((x) => x.h)) && oneBuffer(adapted.map((x) => x.b))
  );
}

/**
 * q, k and v as one dispatch (planQkvMatmul, RoPE in its store), or undefined where an adapted
 * one's h was not computed before (`computed`), which qkvPlacesFit and loraHInMatmulRoles'
 * `qkvOne` make the group's dispatch do.
 */
async function planQkvInOne(
  ctx: GpuContext,
  model: CausalLM,
  layer: Layer,
  a: LayerActivations,
  dest: { readonly q: Tensor; readonly k: Tensor; readonly v: Tensor },
  pos: Positions,
  lora: LoraWeightsByModule | undefined,
  computed: ReadonlySet<LinearRole>,
  tileMath: TileMath,
): Promise<Dispatch | undefined> {
  const c = model.config;
  const projection = (role: 'q' | 'k' | 'v'): QkvProjection | undefined => {
    const l = linear(layer, role);
    const w = lora?.get(l.module.name);
    const h = a.loraH.get(role);
    if (!w) return { w: l.w, out: dest[role] };
    if (!h || !computed.has(role)) return undefined;
    return { w: l.w, out: dest[role], lora: { h, b: w.b, scale: w.scale } };
  };
  const [q, k, v] = (['q', 'k', 'v'] as const).map(projection);
  if (!q || !k || !v) return undefined;
  const rope = {
    invFreq: model.ropeInvFreq as Tensor,
    headDim: c.headDim,
    T: pos.T,
    pos0: pos.pos0 ?? 0,
    scaling: model.ropeAttentionScaling,
  };
  // f16 tiles where all three weights take them (f16TileMathApplies), else f32 for all three.
  const tiles = tileMath === 'f16' && [q, k, v].every((pr) => f16TileMathApplies(ctx, pr.w)) ? 'f16' : 'f32';
  return planQkvMatmul(ctx, a.n1, { q, k, v }, { rope, label: `layer${layer.index}.q_k_v`, tileMath: tiles });
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

/** Plans one transformer layer: attention block, residual, norm, MLP, residual (`fuse`: see
 * ForwardOptions). */
export async function planLayer(
  ctx: GpuContext,
  model: CausalLM,
  layer: Layer,
  a: LayerActivations,
  attention: AttentionBlock,
  lora: LoraWeightsByModule | undefined,
  dropout?: DropoutState,
  fuse = true,
  tileMath: TileMath = 'f32',
  fusions: LayerFusions = layerFusions(ctx),
  attentionMath: TileMath = tileMath,
): Promise<Dispatch[]> {
  const c = model.config;
  const out: Dispatch[] = [];
  const p = `layer${layer.index}`;
  const shared = new Set<LinearRole>();
  const adapted = new Set([...a.loraH.keys()]);
  const ranks = new Map([...a.loraH].map(([role, h]) => [role, h.shape[1] as number]));
  const rows = a.x.size / c.hiddenSize;
  // q, k and v in one dispatch (qkvInOne), RoPE in the store (positions pos0 + row % T, no KV
  // cache), where they, their h and their B are places of one buffer each. Decided before hIn:
  // their h then come from the group's dispatch instead of their matmuls.
  const dest = attention.dest(a, layer.index);
  const qkvOne =
    !attention.kvCache &&
    !attention.positions.positions &&
    !('qkv' in dest) &&
    qkvInOne(c, ranks, rows, dropout !== undefined, fuse, fusions) &&
    qkvPlacesFit(layer, a, dest, lora);
  // Whether the RMSNorms can compute their groups' h (rmsnormLoraFits: A and h places of one buffer
  // each, as the trainer keeps them): where not (generation's own tensors), the projections keep
  // forming theirs in their matmuls where they would otherwise.
  const normH = sharedLoraGroups(c, adapted, dropout !== undefined, fuse).every(
    (g) =>
      !lora ||
      !hInNorm(c, g) ||
      rmsnormLoraFits(
        g.map((role) => ({
          a: (lora.get(linear(layer, role).module.name) as LoraModuleWeights).a,
          h: a.loraH.get(role) as Tensor,
        })),
        c.hiddenSize,
      ),
  );
  const hIn = loraHInMatmulRoles(c, ranks, rows, dropout !== undefined, fuse, fusions.loraHInMatmul, qkvOne, normH);
  const lin: Lin = async (role, x, y, accumulate, activation, second, rope) => {
    const l = linear(layer, role);
    const w = lora?.get(l.module.name);
    const h = a.loraH.get(role);
    out.push(
      ...(await planLinear(
        ctx,
        l,
        x,
        y,
        w,
        h,
        accumulate,
        dropout,
        shared.has(role) ? 'computed' : hIn.has(role) ? 'in_matmul' : 'dispatch',
        activation,
        second,
        tileMath,
        rope,
      )),
    );
  };
  // The h of adapted projections that read the same input, in one dispatch before them.
  const groups = sharedLoraGroups(c, adapted, dropout !== undefined, fuse);
  const sharedH = async (x: Tensor, group: readonly LinearRole[]) => {
    const g = groups.find((roles) => roles.every((r) => group.includes(r)));
    // None when each forms its own h in its matmul (loraHInMatmulRoles).
    if (!g || g.every((role) => hIn.has(role))) return;
    const roles = g.map((role) => {
      const w = lora?.get(linear(layer, role).module.name) as LoraModuleWeights;
      const R = w.a.shape[0] as number;
      return { l: w.a, out: a.loraH.get(role) as Tensor, R };
    });
    out.push(
      await planLoraRowsMulti(
        ctx,
        x,
        roles,
        { M: x.size / (x.shape[1] as number), K: x.shape[1] as number },
        `layer${layer.index}.lora_h.${g.join('_')}`,
      ),
    );
    for (const role of g) shared.add(role);
  };
  // A norm followed by the h of two or three adapted projections reading its output: one dispatch
  // (rmsnorm_fwd_lora, their A places in the trainer's arena, their h in the layer's); otherwise the
  // norm, then sharedH.
  const normAndSharedH = async (
    norm: Norm,
    x: Tensor,
    y: Tensor,
    stats: NormStats,
    label: string,
    xCopy: Tensor | undefined,
    group: readonly LinearRole[],
  ) => {
    const g = groups.find((roles) => roles.every((r) => group.includes(r)));
    const hs: RmsNormLoraH[] | undefined =
      g && hInNorm(c, g)
        ? g.map((role) => {
            const w = lora?.get(linear(layer, role).module.name) as LoraModuleWeights;
            return { a: w.a, h: a.loraH.get(role) as Tensor };
          })
        : undefined;
    if (g && hs && rmsnormLoraFits(hs, norm.w.size)) {
      const io = { x, w: norm.w, y, rstd: stats.rstd, xCopy, lora: hs };
      out.push(await planRmsNormForward(ctx, io, { eps: c.norm.eps, label }));
      for (const role of g) shared.add(role);
      return;
    }
    out.push(await planNorm(ctx, model, norm, x, y, stats, label, xCopy));
    await sharedH(y, group);
  };

  // The residual adds cost no dispatch: each norm copies its input to where the block's last
  // projection then adds its output (o_proj into mid, down_proj into out); when the second norm
  // runs inside the gated MLP's dispatch, down_proj adds mid as it stores instead (matmul_resid).
  // In place (inference: mid and out are x) there is nothing to copy.
  const copy = (from: Tensor, to: Tensor) => (to === from ? undefined : to);
  await normAndSharedH(layer.norm1, a.x, a.n1, a.n1Stats, `${p}.norm1`, copy(a.x, a.mid), ['q', 'k', 'v']);
  // Decoding, fused: RoPE writes the new keys and values into the cache itself.
  const kvCache =
    fuse && attention.kvCache && !('qkv' in dest)
      ? { k: attention.kvCache.k(layer.index), v: attention.kvCache.v(layer.index), maxRow: attention.kvCache.maxRow }
      : undefined;
  // q, k and v in one dispatch (qkvInOne) where the buffers allow, else qkvSteps' dispatches.
  const pos = attention.positions;
  const qkv =
    qkvOne && !('qkv' in dest)
      ? await planQkvInOne(ctx, model, layer, a, dest, pos, lora, shared, tileMath)
      : undefined;
  if (qkv) out.push(qkv);
  else await planProjections(ctx, model, layer, a, dest, pos, lin, out, fuse, fusions, kvCache);
  if (attention.afterProjections && !kvCache) out.push(...(await attention.afterProjections(a, layer.index)));
  // f16 tiles in the attention too where the plan asks for them (attentionMath).
  const attentionTiles: TileMath = attentionMath === 'f16' && ctx.features.shaderF16 ? 'f16' : 'f32';
  const attend = await planAttentionForward(
    ctx,
    { ...attention.attend(a, layer.index, dest), o: a.attn, lse: a.lse, tileMath: attentionTiles },
    `${p}.attention`,
  );
  attention.onPlanned?.(layer.index, attend);
  out.push(...attend);
  await lin('o', a.attn, a.mid, true);
  const d = c.hiddenSize;
  // The second norm inside the gated MLP's dispatch, which then reads mid (normInGatedMlp).
  const norm2InMlp = normInGatedMlp(c, adapted, fuse, a.mid.size / d, a.mid === a.out, fusions.normInMlp);
  if (!norm2InMlp)
    await normAndSharedH(layer.norm2, a.mid, a.n2, a.n2Stats, `${p}.norm2`, copy(a.mid, a.out), ['gate', 'up']);
  // The nonlinearity: the fc (up) projection's epilogue when fused, a dispatch of its own otherwise.
  if (c.family === 'gpt2') {
    await lin('fc', a.n2, a.gate, false, fuse ? { kind: 'gelu', act: a.act } : undefined);
    if (!fuse) out.push(await planGeluNewForward(ctx, { x: a.gate, y: a.act }, `${p}.gelu`));
  } else {
    const up = a.up as Tensor;
    if (gatedMlpFused(c, adapted, fuse)) {
      // gate, up and silu(gate)·up from one pass over n2 (or over mid, normalized as it is staged).
      const glu = { w: linear(layer, 'up').w, up, act: a.act };
      const gateW = linear(layer, 'gate').w;
      const norm = norm2InMlp ? { w: layer.norm2.w, rstd: a.n2Stats.rstd, eps: c.norm.eps } : undefined;
      const opts = { glu, norm, label: `${p}.mlp.gate_up` };
      const input = norm2InMlp ? a.mid : a.n2;
      out.push(
        await planMatmul(ctx, input, gateW, a.gate, { ...opts, tileMath: tilesFor(ctx, tileMath, gateW, opts) }),
      );
    } else {
      await lin('gate', a.n2, a.gate);
      await lin('up', a.n2, up, false, fuse ? { kind: 'silu_mul', gate: a.gate, act: a.act } : undefined);
      if (!fuse) out.push(await planSiluMulForward(ctx, { gate: a.gate, up, out: a.act }, `${p}.silu_mul`));
    }
  }
  if (norm2InMlp && a.mid !== a.out) {
    // No norm copied mid to out: the (unadapted) down projection adds it as it stores.
    const down = linear(layer, 'down');
    const opts = { bias: down.bias, residual: a.mid, label: down.module.name };
    out.push(await planMatmul(ctx, a.act, down.w, a.out, { ...opts, tileMath: tilesFor(ctx, tileMath, down.w, opts) }));
  } else await lin('down', a.act, a.out, true);
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
  const alloc = new Allocator(ctx, opts.label ?? 'forward');
  const dispatches: Dispatch[] = [];
  try {
    const recompute = mode === 'train' && (opts.recompute ?? false);
    // LoRA dropout (training only): one scratch as wide as the widest adapted input.
    const dropIn = [...(opts.lora?.values() ?? [])]
      .filter((w) => (w.dropout?.p ?? 0) > 0)
      .map((w) => w.a.shape[1] as number);
    const dropoutWidth = mode === 'train' && dropIn.length > 0 ? Math.max(...dropIn) : 0;
    if (dropoutWidth > 0 && !opts.dropoutCounter) throw new ShapeError('forward: LoRA dropout needs a dropoutCounter');
    const layout = forwardLayout(c, adapterRanks(opts.lora), {
      B,
      T,
      mode,
      recompute,
      logits: opts.logits,
      dropoutWidth,
    });
    const tensors = new Map<string, Tensor>();
    for (const b of layout.buffers) {
      const t = b.dtype === 'f32' ? alloc.f32([...b.shape], b.label) : alloc.of([...b.shape], b.dtype, b.label);
      tensors.set(b.label, t);
      for (const [label, view] of placeViews(t, b, alloc.prefix)) tensors.set(label, view);
    }
    const get = (label: string) => tensors.get(label) as Tensor;
    const ids = get('ids');
    const errors = get('embedding_errors');
    const embedded = get('embedded');
    dispatches.push(
      ...(await planEmbeddingTable(
        ctx,
        { ids, table: model.embed, wpe: model.positions, out: embedded, errors },
        { T, label: 'embedding' },
      )),
    );
    const layers: LayerActivations[] = [];
    const layerDispatches: Dispatch[][] = [];
    const attention = batchedAttention(model, B, T);
    // f16 in the attention only where its tiled forward takes the f16 build (the rows kernels stay
    // f32); a training backward reads q, k and v as it staged them (ForwardPlan.attentionTileMath).
    const attentionMath: TileMath =
      opts.tileMath === 'f16' && ctx.features.shaderF16 && attentionVariant(ctx) === 'tiled' ? 'f16' : 'f32';
    const dropout: DropoutState | undefined =
      dropoutWidth > 0 ? { counter: opts.dropoutCounter as Tensor, scratch: get('lora_dropout') } : undefined;
    let x = embedded;
    for (let i = 0; i < c.numLayers; i++) {
      const acts = layerActivations(layout.layers[i] as ReadonlyMap<string, string>, get);
      layers.push(acts);
      const planned = await planLayer(
        ctx,
        model,
        model.layers[i] as Layer,
        acts,
        attention,
        opts.lora,
        dropout,
        opts.fuse ?? true,
        opts.tileMath ?? 'f32',
        layerFusions(ctx, opts),
        attentionMath,
      );
      layerDispatches.push(planned);
      dispatches.push(...planned);
      x = acts.out;
    }
    const hidden = get('hidden');
    const finalStats: NormStats = { rstd: get('final_norm.rstd'), mean: tensors.get('final_norm.mean') };
    dispatches.push(await planNorm(ctx, model, model.finalNorm, x, hidden, finalStats, 'final_norm'));
    const logits = tensors.get('logits');
    if (logits) dispatches.push(...(await planTableProduct(ctx, hidden, model.lmHead, logits, 'lm_head', alloc.owned)));
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
      opts.fuse ?? true,
      attentionMath,
    );
  } catch (e) {
    for (const dsp of dispatches) dsp.dispose();
    for (const t of alloc.owned) t.dispose();
    throw e;
  }
}
