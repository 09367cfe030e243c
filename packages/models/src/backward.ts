/**
 * The backward pass of a causal LM with LoRA adapters, planned against a train-mode forward plan:
 * the chunked cross-entropy gives ∂L/∂hidden, then the final norm and every layer in reverse down
 * to the lowest one with an adapter (lowestAdaptedLayer: nothing below needs a gradient). The
 * frozen weights get no gradient; only the LoRA A and B matrices do (accumulated into their
 * gradient buffers, which the trainer clears after each optimizer step).
 *
 * One residual-gradient buffer runs through the layers: each norm's backward adds its input
 * gradient into it in place, which is exactly the residual connection's sum.
 */
import {
  type AttentionVariant,
  arenaLayout,
  attentionTakesRope,
  attentionVariant,
  type CrossEntropyGradPlan,
  createTensor,
  type Dispatch,
  fusedQkvLayout,
  type GpuContext,
  type LoraDaModule,
  type LoraGradModule,
  loraDaManyRefusal,
  loraGdBMaxRank,
  loraGradManyRefusal,
  loraGradPairable,
  loraGradPairPays,
  lossScaledTiles,
  MATVEC_MAX_ROWS,
  type MatmulActivationBackward,
  type MatmulOptions,
  normInMlpPays,
  planAttentionBackward,
  planCopyRows,
  planCrossEntropyTraining,
  planGeluNewBackward,
  planInterleave3,
  planLayerNormBackward,
  planLoraBackward,
  planLoraColsMulti,
  planLoraDaMany,
  planLoraGradGdBMany,
  planLoraGradGdBPair,
  planMatmul,
  planRmsNormBackward,
  planRopeBackward,
  planSiluMulBackward,
  type Tensor,
  type TileMath,
} from '@webtune/core';
import { type LinearRole, modelLayout } from './architecture.js';
import type { ModelConfig } from './config.js';
import {
  type AdapterRanks,
  adaptedRoles,
  type ForwardPlan,
  type LayerActivations,
  type LayerFusions,
  type LoraInputKey,
  layerDispatchCount,
  loraDaChunkOf,
  loraDaChunks,
  loraDaDeferred,
  loraDropout,
  loraInputKey,
  type NormStats,
  PLACE_ALIGNMENT,
  type PlannedBuffer,
  placeViews,
  plannedArena,
  projectionSteps,
  sharedLoraGroups,
} from './forward.js';
import type { Layer, Linear, Norm } from './model.js';

/** One adapted module's trainable tensors and their gradients (views into arenas, usually). */
export interface LoraTrainable {
  /** [r, in] and [out, r]. */
  readonly a: Tensor;
  readonly b: Tensor;
  /** Gradients, same shapes: accumulated into (cleared by the trainer after each update). */
  readonly da: Tensor;
  readonly db: Tensor;
  readonly scale: number;
  /** LoRA dropout (see LoraModuleWeights). */
  readonly dropout?: { readonly p: number; readonly module: number };
}

export interface BackwardPlan {
  /** [B·T] i32 shifted targets: labels[t+1], -100 where no loss is taken. Write before submitting. */
  readonly labels: Tensor;
  /** f32 [4]: loss (sum / divisor), the number of counted positions, and the loss backward's
   * coefficient g / divisor. */
  readonly loss: Tensor;
  /** u32 [2]: labels outside the vocabulary (see the cross-entropy kernel). */
  readonly errors: Tensor;
  /** The loss's plan, whose divisor the trainer sets per step (gradient accumulation). */
  readonly crossEntropy: CrossEntropyGradPlan;
  /** Loss forward + backward through every layer, in order. */
  readonly dispatches: readonly Dispatch[];
  readonly scratchBytes: number;
  dispose(): void;
}

/**
 * The buffers planBackward allocates (labels without the 'backward.' prefix), apart from the loss's
 * logits chunk: the single description of the backward's scratch, which estimateMemory sums too.
 * Everything but the LoRA gradient g (one per rank in use) is one layer's worth, shared by all.
 */
export function backwardLayout(
  config: ModelConfig,
  ranks: AdapterRanks,
  /** normInDx: as planBackward's; default true, as backwardDispatchCount's (the GPU plan).
   * attention: how the device plans attention's backward (AttentionBackwardPlanning); default
   * GPU_ATTENTION.
   * recompute: the forward recomputes activations (no norm1InDownDx). */
  opts: {
    B: number;
    T: number;
    dropout?: boolean;
    fuse?: boolean;
    normInDx?: boolean;
    attention?: AttentionBackwardPlanning;
    recompute?: boolean;
  },
): PlannedBuffer[] {
  const c = config;
  const { B, T } = opts;
  const rows = B * T;
  const d = c.hiddenSize;
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const gpt2 = c.family === 'gpt2';
  const out: PlannedBuffer[] = [];
  const add = (label: string, shape: number[], dtype: PlannedBuffer['dtype'] = 'f32', when = true) => {
    if (when) out.push({ label, shape, dtype });
  };
  /** An f32 arena of these places (labels and shapes). */
  const arena = (label: string, places: { label: string; shape: number[] }[]) => {
    out.push(plannedArena(label, places));
  };
  add('labels', [rows], 'i32');
  add('loss', [4]); // loss, count, and the coefficient the loss's backward reads (planCrossEntropyTraining)
  add('loss_errors', [2], 'u32');
  add('lse', [rows]);
  add('d_hidden', [rows, d]);
  add('d_resid', [rows, d]);
  // The other residual gradient where a norm's backward runs in o's dx (norm2InODx): it writes
  // ∂L/∂mid while its other workgroups still read ∂L/∂out, so the two take turns.
  // Only layers the backward reaches (lowestAdaptedLayer and above): an unadapted layer's o does not
  // make a buffer that nothing uses.
  const lowest = lowestAdaptedLayer(c, ranks);
  const norm1Folded = norm1Folds(
    c,
    ranks,
    rows,
    opts.fuse ?? true,
    opts.normInDx ?? true,
    opts.recompute ?? false,
    opts.dropout ?? false,
  );
  const folds =
    norm1Folded.some((f) => f) ||
    modelLayout(c).layers.some(
      (l, i) =>
        i >= lowest &&
        norm2InODx(c, new Set(adaptedRoles(l, ranks).keys()), rows, opts.fuse ?? true, opts.normInDx ?? true),
    );
  add('d_resid_next', [rows, d], 'f32', folds);
  add('d_norm_out', [rows, d]);
  // ∂L/∂act, unless every down projection's dx kernel stores the nonlinearity's backward itself.
  const downDropout =
    (opts.dropout ?? false) &&
    modelLayout(c).layers.some((l) => l.linears.some((m) => m.role === 'down' && ranks.has(m.name)));
  // ...and where the down projection's dx takes the next layer's norm1 backward instead (its
  // ∂L/∂act then goes to gate and up's dx, matmul_glu_bwd).
  add('d_act', [rows, I], 'f32', !(opts.fuse ?? true) || downDropout || norm1Folded.some((f) => f));
  add('d_gate', [rows, I]);
  add('d_up', [rows, I], 'f32', !gpt2);
  add('d_attn', [rows, qDim]);
  // ∂L/∂ q, k and v as their projections' dx read them: places of one buffer, so that the dx of
  // all three is one dispatch (matmul_sum_lr binds two of them as one operand). With q/k norms
  // those are the norms' input gradients, and attention's dq and dk another buffer: WebGPU lets no
  // dispatch read a buffer that it writes, and the norms' backward reads dq and writes dq_raw.
  const grads = (q: string, k: string) => [
    { label: q, shape: [rows, qDim] },
    { label: k, shape: [rows, kvDim] },
    { label: 'dv', shape: [rows, kvDim] },
  ];
  if (c.qkNorm) {
    arena('attention_grads', grads('dq', 'dk').slice(0, 2));
    arena('projection_grads', grads('dq_raw', 'dk_raw'));
  } else arena('projection_grads', grads('dq', 'dk'));
  // attention's delta, unless its backward is one dispatch, which forms delta where it needs it.
  add(
    'attention_delta',
    [B, c.numHeads, T],
    'f32',
    !attentionBackwardInOne(c, rows, opts.fuse ?? true, opts.attention ?? GPU_ATTENTION),
  );
  add('dqkv', [rows, 3 * d], 'f32', gpt2);
  add('zero', [1], 'i32', gpt2 && !(opts.fuse ?? true)); // the plain path's copies' position
  // LoRA's g: one per rank in use; projections sharing an input whose dA is one dispatch keep
  // theirs apart until it runs (slot s of a group, `lora_g{s}_r{r}`). Places of one buffer, so that
  // a dx dispatch can take two adapted projections' LoRA terms (matmul_sum_lr).
  // Only the projections whose dA is not deferred (loraDaChunks, below) take these.
  const layers = modelLayout(c).layers;
  const daChunks = loraDaDeferred(opts.fuse ?? true, opts.dropout ?? false, opts.recompute ?? false)
    ? loraDaChunks(c, ranks, rows)
    : [];
  const deferred = loraDaChunkOf(daChunks);
  const kept = new Map<string, number>();
  const slotsPerLayer = layers.map((l, i) => {
    const roles = [...adaptedRoles(l, ranks)].filter(([role]) => deferred(i, loraInputKey(role)) === undefined);
    for (const m of l.linears)
      if (roles.some(([role]) => role === m.role)) kept.set(m.name, ranks.get(m.name) as number);
    return gSlots(c, new Set(roles.map(([role]) => role)), opts.dropout ?? false, opts.fuse ?? true);
  });
  const slots = Math.max(1, ...slotsPerLayer);
  const g: { label: string; shape: number[] }[] = [];
  for (const r of [...new Set(kept.values())].sort((a, b) => a - b)) {
    for (let slot = 0; slot < slots; slot++) g.push({ label: `lora_g${slot || ''}_r${r}`, shape: [rows, r] });
  }
  if (g.length > 0) arena('lora_g', g);
  // The g of projections whose dA waits for their chunk's dispatch (loraDaChunks): a place each, in
  // one arena per chunk, which that dispatch binds whole.
  for (const [ci, chunk] of daChunks.entries()) {
    arena(
      `lora_g_da${ci}`,
      chunk.modules.map(({ layer, role, r }) => ({ label: `layer${layer}.${role}.lora_g`, shape: [rows, r] })),
    );
  }
  return out;
}

/** The size of a layer's largest shared-input LoRA group among these adapted projections (0 when
 * none). */
function gSlots(config: ModelConfig, adapted: ReadonlySet<LinearRole>, dropout: boolean, fuse: boolean): number {
  return Math.max(0, ...sharedLoraGroups(config, adapted, dropout, fuse).map((g) => g.length));
}

/**
 * Whether layer i's first norm's backward runs in the prologue of the down projection's dx in
 * layer i − 1 (matmul_norm_bwd, as norm2InODx does in o's dx) instead of a dispatch of its own: where
 * `pays`, fused, an RMSNorm before a gated MLP, more than MATVEC_MAX_ROWS rows, no recomputation
 * (layer i's saved rstd must outlive the replay of layer i − 1), no LoRA dropout (with it the plan
 * keeps gate's and up's dx apart), and gate, up and down of layer i − 1 unadapted. That down projection's dx then stores ∂L/∂act, and its gate and up's dx form the
 * nonlinearity's backward as they stage it (matmul_glu_bwd): the dispatches of that MLP stay two.
 */
export function norm1InDownDx(
  config: ModelConfig,
  adaptedBelow: ReadonlySet<LinearRole>,
  rows: number,
  fuse: boolean,
  pays: boolean,
  recompute: boolean,
  dropout: boolean,
): boolean {
  return (
    pays &&
    fuse &&
    !recompute &&
    !dropout &&
    config.family !== 'gpt2' &&
    config.norm.kind === 'rms' &&
    rows > MATVEC_MAX_ROWS &&
    !['gate', 'up', 'down'].some((r) => adaptedBelow.has(r as LinearRole))
  );
}

/** Per layer i, whether its norm1 backward runs in layer i − 1's down dx (norm1InDownDx); false
 * for the lowest adapted layer and those below it, which have no norm1 backward. */
function norm1Folds(
  config: ModelConfig,
  ranks: AdapterRanks,
  rows: number,
  fuse: boolean,
  pays: boolean,
  recompute: boolean,
  dropout: boolean,
): boolean[] {
  const layers = modelLayout(config).layers;
  const lowest = lowestAdaptedLayer(config, ranks);
  return layers.map(
    (_, i) =>
      i > lowest &&
      norm1InDownDx(
        config,
        new Set(adaptedRoles(layers[i - 1] as (typeof layers)[number], ranks).keys()),
        rows,
        fuse,
        pays,
        recompute,
        dropout,
      ),
  );
}

/**
 * Whether the backward of a layer's second norm runs in the prologue of o's dx (planMatmul's
 * normBackward, matmul_norm_bwd) instead of a dispatch of its own: where `pays`, fused, an RMSNorm,
 * o unadapted (its dx kernel has no room for the LoRA term beside the norm's operands) and more than
 * MATVEC_MAX_ROWS rows.
 */
export function norm2InODx(
  config: ModelConfig,
  adapted: ReadonlySet<LinearRole>,
  rows: number,
  fuse: boolean,
  pays: boolean,
): boolean {
  return pays && fuse && config.norm.kind === 'rms' && !adapted.has('o') && rows > MATVEC_MAX_ROWS;
}

/** The first layer with an adapted projection (numLayers when none): the backward stops there. */
export function lowestAdaptedLayer(config: ModelConfig, ranks: AdapterRanks): number {
  const i = modelLayout(config).layers.findIndex((l) => l.linears.some((m) => ranks.has(m.name)));
  return i < 0 ? config.numLayers : i;
}

/** Whether the fused backward leaves RoPE's backward to the attention kernels (dq and dk come out
 * unrotated; see planAttentionBackward's `rope`): no dispatch of its own. */
export function ropeInAttentionBackward(config: ModelConfig, fuse: boolean): boolean {
  return fuse && config.rope !== undefined && attentionTakesRope(config.headDim);
}

/**
 * The dx dispatches of projections that read one input (`roles` of a shared-input group, in
 * order), each the roles whose dy·W it sums. Fused without dropout (`sumLr`): up to three
 * projections to a dispatch with the LoRA terms of the adapted ones (matmul_sum_lr: their g are
 * places of one arena, their A of the LoRA parameters'); q, k and v are then one dispatch. Otherwise projectionSteps' (`pair`: an adapted projection with an
 * unadapted one beside it; not with dropout, whose dx is three dispatches).
 */
export function dxSteps(
  roles: readonly LinearRole[],
  adapted: ReadonlySet<LinearRole>,
  sumLr: boolean,
  pair: boolean,
): LinearRole[][] {
  if (!sumLr) return projectionSteps(roles, adapted, pair).map((s) => (s.extra ? [s.role, s.extra] : [s.role]));
  const steps: LinearRole[][] = [];
  let step: LinearRole[] = [];
  for (const role of roles) {
    if (step.length === 3) {
      steps.push(step);
      step = [];
    }
    step.push(role);
  }
  if (step.length > 0) steps.push(step);
  return steps;
}

/**
 * Whether each layer's attention backward is one dispatch (planAttentionBackward's
 * attention_bwd): fused, on the tiled kernels, with ∂L/∂q, k and v places of one buffer, which
 * backwardLayout makes them except with q/k norms (their input gradients take that buffer).
 */
export function attentionBackwardInOne(
  config: ModelConfig,
  rows: number,
  fuse: boolean,
  attention: AttentionBackwardPlanning,
): boolean {
  return fuse && attention.tiled && !config.qkNorm && attentionGradSpan(config, rows) <= attention.maxBinding;
}

/** What decides attention's backward on a device: whether it runs the tiled kernels
 * (attentionVariant), and its maxStorageBufferBindingSize (the one dispatch binds ∂L/∂q, k and v
 * as one range). */
export interface AttentionBackwardPlanning {
  readonly tiled: boolean;
  readonly maxBinding: number;
}

/** A GPU with WebGPU's default binding limit: the count and layout's default. */
export const GPU_ATTENTION: AttentionBackwardPlanning = { tiled: true, maxBinding: 128 * 1024 * 1024 };

/** Bytes of the range of backwardLayout's arena that holds ∂L/∂q, k and v, as
 * planAttentionBackward binds it. */
function attentionGradSpan(config: ModelConfig, rows: number): number {
  const qDim = config.numHeads * config.headDim;
  const kvDim = config.numKvHeads * config.headDim;
  const { offsets } = arenaLayout(
    [
      [rows, qDim],
      [rows, kvDim],
      [rows, kvDim],
    ],
    PLACE_ALIGNMENT,
  );
  return (offsets[2] as number) + Math.ceil((rows * kvDim * 4) / 16) * 16;
}

/** Dispatches of one layer's attention backward: one, two (dq with delta, then dk and dv), or
 * three planned plain (delta apart). */
export function attentionBackwardDispatches(
  config: ModelConfig,
  rows: number,
  fuse: boolean,
  attention: AttentionBackwardPlanning,
): number {
  return attentionBackwardInOne(config, rows, fuse, attention) ? 1 : fuse ? 2 : 3;
}

/**
 * Dispatches of planBackward's plan, given the loss's dispatches: the final norm, then per layer
 * (last first, down to the lowest adapted one) the replayed forward when recomputing, and the
 * backward of every block (no dx of the lowest adapted layer's input). It assumes the LoRA
 * matrices are places of one arena, as the trainer keeps them: a caller's own tensors get
 * projectionSteps' dx dispatches instead of dxSteps' (one or two more per layer where two adapted
 * projections read one input), and their dA per layer (loraDaManyRefusal). So does an operand
 * arena larger than the device binds: lora_g_db_many and lora_da_many bind theirs whole. With
 * pairGdB it counts a shared-input group's g and dB in its lora_g_db_pair or lora_g_db_many at
 * any rank; where those refuse the operands, the plan forms them per module (two dispatches each
 * above gdBMaxRank), which the count does not follow.
 */
export function backwardDispatchCount(
  config: ModelConfig,
  ranks: AdapterRanks,
  opts: {
    /** Rows of the batch (B·T): the replayed forward's count depends on them (normInGatedMlp). */
    rows: number;
    recompute?: boolean;
    lossDispatches: number;
    dropout?: boolean;
    fuse?: boolean;
    /** lora_g_db_pair is planned (loraGradPairPays on the device). Default true. */
    pairGdB?: boolean;
    /** The largest rank whose g and dB are one dispatch (loraGdBMaxRank on the device). Default
     * every rank. */
    gdBMaxRank?: number;
    /** The replayed forward's fusions (layerFusions). Default GPU_FUSIONS. */
    fusions?: LayerFusions;
    /** The second norm's backward in o's dx where norm2InODx allows. Default true. */
    normInDx?: boolean;
    /** How the device plans attention's backward. Default GPU_ATTENTION. */
    attention?: AttentionBackwardPlanning;
  },
): number {
  const fuse = opts.fuse ?? true;
  const c = config;
  const layers = modelLayout(c).layers;
  let n = opts.lossDispatches + 1;
  const lowest = lowestAdaptedLayer(c, ranks);
  const folded = norm1Folds(
    c,
    ranks,
    opts.rows,
    fuse,
    opts.normInDx ?? true,
    opts.recompute ?? false,
    opts.dropout ?? false,
  );
  // LoRA's dA: one dispatch per chunk of layers (loraDaChunks) instead of those below, as the
  // trainer's arenas allow.
  const daChunks = loraDaDeferred(fuse, opts.dropout ?? false, opts.recompute ?? false)
    ? loraDaChunks(c, ranks, opts.rows)
    : [];
  const daChunkOf = loraDaChunkOf(daChunks);
  n += daChunks.length;
  layers.forEach((l, i) => {
    if (i < lowest) return; // no backward below the lowest adapted layer
    // In it, no dx of its input: the projections reading n1 keep their LoRA gradients only (dx is
    // one dispatch of an adapted projection's, three with dropout), and no norm1 backward.
    const input = i > lowest;
    const roles = adaptedRoles(l, ranks);
    const adapted = new Set(roles.keys());
    if (opts.recompute && i < layers.length - 1)
      n += layerDispatchCount(c, roles, opts.rows, opts.dropout, fuse, opts.fusions);
    // A shared-input group's dA are one dispatch instead of one each, and with pairGdB its g and
    // dB one dispatch too (lora_g_db_pair for two, lora_g_db_many for three; their operands in
    // arenas, as the trainer keeps them).
    const pairGdB = opts.pairGdB ?? true;
    const groups = sharedLoraGroups(c, adapted, opts.dropout ?? false, fuse);
    for (const g of groups) n -= g.length - 1 + (pairGdB ? g.length - 1 : 0);
    // LoRA: g and dB (one dispatch fused, at ranks up to gdBMaxRank or in a group's), dA, dx; with
    // dropout also the mask again, g·A and its masked add into dx.
    const inGroupGdB = (role: LinearRole) => pairGdB && groups.some((g) => g.includes(role));
    const gdBApart = (role: LinearRole) =>
      !fuse || ((roles.get(role) ?? 0) > (opts.gdBMaxRank ?? Number.POSITIVE_INFINITY) && !inGroupGdB(role));
    const loraOf = (role: LinearRole) => (opts.dropout ? 6 : 3) + (gdBApart(role) ? 1 : 0);
    const lin = (role: LinearRole) => (adapted.has(role) ? loraOf(role) : 1);
    // Deferred dA: a group's one dispatch, or a lone projection's own, goes.
    const deferred = (role: LinearRole) => daChunkOf(i, loraInputKey(role)) !== undefined;
    n -= groups.filter((g) => deferred(g[0] as LinearRole)).length;
    n -= [...adapted].filter((role) => !groups.some((g) => g.includes(role)) && deferred(role)).length;
    // The two norms (the first in the down projection's dx of the layer below where
    // norm1InDownDx, the second in o's dx where norm2InODx), attention (dq, dk and dv in one; dq
    // with delta, dk/dv; or delta apart).
    const norm2 = norm2InODx(c, adapted, opts.rows, fuse, opts.normInDx ?? true) ? 0 : 1;
    n +=
      (input && !folded[i] ? 1 : 0) +
      norm2 +
      attentionBackwardDispatches(c, opts.rows, fuse, opts.attention ?? GPU_ATTENTION);
    const dxOf = opts.dropout ? 3 : 1;
    const inputLin = (role: LinearRole) => (input ? lin(role) : adapted.has(role) ? loraOf(role) - dxOf : 0);
    // The nonlinearity's backward: in the down projection's dx kernel when fused (not with
    // dropout on an adapted down).
    const act = fuse && !(opts.dropout && adapted.has('down')) ? 0 : 1;
    if (c.family === 'gpt2')
      n += lin('fc') + act + (fuse ? 1 : 3) + inputLin('qkv'); // dq, dk, dv into dqkv
    else {
      // A shared-input group: each adapted projection's LoRA dispatches (its dx among them), and
      // the dx dispatches of the rest (projectionSteps).
      // Fused without dropout, the dx of the group are dxSteps' dispatches (matmul_sum_lr).
      const group = (roles: LinearRole[], dx = true) => {
        const lora = roles.filter((r) => adapted.has(r)).reduce((n, r) => n + loraOf(r) - dxOf, 0);
        const sumLr = fuse && !opts.dropout;
        if (sumLr) return lora + (dx ? dxSteps(roles, adapted, true, true).length : 0);
        const plain = projectionSteps(roles, adapted, fuse && !opts.dropout).filter((s) => !adapted.has(s.role)).length;
        const adaptedDx = roles.filter((r) => adapted.has(r)).length * dxOf;
        return lora + (dx ? adaptedDx + plain : 0);
      };
      const rope = ropeInAttentionBackward(c, fuse) ? 0 : fuse ? 1 : 2; // q and k together, or apart
      n += group(['gate', 'up']) + act + rope + (c.qkNorm ? 2 : 0) + group(['q', 'k', 'v'], input);
    }
    n += lin('o') + lin('down');
  });
  return n;
}

class Scratch {
  readonly owned: Tensor[] = [];
  private readonly byLabel = new Map<string, Tensor>();
  /** Allocates every buffer of `layout`, and views of an arena's places (what was made is in
   * `owned` if it throws; views own no buffer). */
  allocate(ctx: GpuContext, layout: readonly PlannedBuffer[]): void {
    for (const b of layout) {
      const t = createTensor(ctx, [...b.shape], b.dtype, `backward.${b.label}`);
      this.owned.push(t);
      this.byLabel.set(b.label, t);
      for (const [label, view] of placeViews(t, b, 'backward')) this.byLabel.set(label, view);
    }
  }
  get(label: string): Tensor {
    const t = this.byLabel.get(label);
    if (!t) throw new Error(`backward layout has no ${label}`);
    return t;
  }
  maybe(label: string): Tensor | undefined {
    return this.byLabel.get(label);
  }
}

export async function planBackward(
  ctx: GpuContext,
  fwd: ForwardPlan,
  lora: ReadonlyMap<string, LoraTrainable>,
  opts: {
    /** Plan lora_g_db_pair where B and dB allow (loraGradPairable). Default loraGradPairPays(ctx):
     * on GPUs; tests set it to run the pair on any adapter. */
    pairGdB?: boolean;
    /** The largest rank whose g and dB are one dispatch (lora_g_db) outside a lora_g_db_pair or
     * lora_g_db_many. Default loraGdBMaxRank(ctx). */
    gdBMaxRank?: number;
    /** The second norm's backward in o's dx where norm2InODx allows. Default normInMlpPays(ctx)
     * (GPUs); tests set it to run it on any adapter. */
    normInDx?: boolean;
    /** The attention kernels. Default attentionVariant(ctx); tests set 'tiled' to run the GPUs'
     * plan (dq, dk and dv in one dispatch) on any adapter. */
    attention?: AttentionVariant;
    /**
     * A dynamic loss scale's state (core's loss_scale.ts; S in element 0): the loss's gradient, and
     * so every gradient of the backward and the LoRA gradients it accumulates, carry S, which the
     * optimizer divides out (adamw_step_scaled).
     */
    lossScale?: Tensor;
    /**
     * The tile math of the products that carry gradients (dy·W for dx, with its prologues and
     * epilogues, and the loss's dH): 'f16' (needs `lossScale` and shader-f16) stages the scaled
     * gradients and the weights stored below f32 in f16 with f32 accumulation, where
     * f16TileMathApplies allows it; other products keep f32. Default 'f16' with `lossScale` on an
     * adapter with shader-f16, else 'f32'. The tiled attention backward stages its dout in f16 too
     * where the forward staged q, k and v in f16 (AttentionBackwardArgs.gradTileMath). LoRA's own
     * gradient kernels (g, dA, dB) stay f32.
     */
    gradTileMath?: TileMath;
  } = {},
): Promise<BackwardPlan> {
  const pairGdB = opts.pairGdB ?? loraGradPairPays(ctx);
  const gdBMaxRank = opts.gdBMaxRank ?? loraGdBMaxRank(ctx);
  const normInDx = opts.normInDx ?? normInMlpPays(ctx);
  if (fwd.mode !== 'train') throw new Error('planBackward needs a forward plan made with mode "train"');
  const gradTiles = opts.gradTileMath ?? (opts.lossScale && ctx.features.shaderF16 ? 'f16' : 'f32');
  if (gradTiles === 'f16' && !opts.lossScale)
    throw new Error('planBackward: f16 tiles for the gradients need a loss scale (lossScale)');
  // The tiled attention backward stages its scaled dout in f16 where the forward staged q, k and v so.
  const attentionGradTiles: TileMath = gradTiles === 'f16' && fwd.attentionTileMath === 'f16' ? 'f16' : 'f32';
  /** A product that carries gradients: f16 tiles where they apply (see gradTileMath). */
  const gradTileOptions = (w: Tensor, o: MatmulOptions): MatmulOptions => lossScaledTiles(ctx, w, o, gradTiles);
  const model = fwd.model;
  const c = model.config;
  const rows = fwd.rows;
  const { B, T } = fwd;
  const d = c.hiddenSize;
  const ranks = new Map([...lora].map(([name, t]) => [name, t.a.shape[0] as number]));
  const out: Dispatch[] = [];
  let ce: CrossEntropyGradPlan | undefined;
  const s = new Scratch();
  try {
    const attention = opts.attention ?? attentionVariant(ctx);
    const attentionPlanning = {
      tiled: attention === 'tiled',
      maxBinding: ctx.limits.maxStorageBufferBindingSize,
    };
    s.allocate(
      ctx,
      backwardLayout(c, ranks, {
        B,
        T,
        dropout: fwd.dropout !== undefined,
        fuse: fwd.fuse,
        normInDx,
        attention: attentionPlanning,
        recompute: fwd.recompute,
      }),
    );
    const labels = s.get('labels');
    const loss = s.get('loss');
    const errors = s.get('loss_errors');
    const lse = s.get('lse');
    const dHidden = s.get('d_hidden');
    ce = await planCrossEntropyTraining(
      ctx,
      {
        h: fwd.hidden,
        e: model.lmHead,
        labels,
        lse,
        loss,
        errors,
        dh: dHidden,
        ...(opts.lossScale ? { lossScale: opts.lossScale } : {}),
      },
      { label: 'loss', dhTileMath: gradTiles },
    );
    out.push(...ce.dispatches);

    // Shared across layers: the backward handles one layer at a time.
    // ∂L/∂ the current layer's output; it moves to the other buffer where o's dx writes ∂L/∂mid.
    let dResid = s.get('d_resid');
    let dResidOther = s.maybe('d_resid_next');
    const dNorm = s.get('d_norm_out');
    const dAct = s.maybe('d_act');
    const dGate = s.get('d_gate');
    const dUp = s.maybe('d_up');
    const dAttn = s.get('d_attn');
    const dq = s.get('dq');
    const dk = s.get('dk');
    const dv = s.get('dv');
    const delta = s.maybe('attention_delta');
    const dqRaw = s.maybe('dq_raw');
    const dkRaw = s.maybe('dk_raw');
    const dqkv = s.maybe('dqkv');
    const zero = s.maybe('zero');
    const g = (r: number, slot = 0) => s.get(`lora_g${slot || ''}_r${r}`);
    // LoRA's dA left to one dispatch per chunk of layers (loraDaChunks), where the chunk's inputs,
    // g and dA lie as that dispatch binds them (places of one buffer each: the forward's lora_x
    // arena, our lora_g_da, the trainer's gradients); the other chunks keep their dA dispatches.
    const daChunks = loraDaDeferred(fwd.fuse, fwd.dropout !== undefined, fwd.recompute)
      ? loraDaChunks(c, ranks, rows)
      : [];
    const input = (a: LayerActivations, key: LoraInputKey) => ({ n1: a.n1, attn: a.attn, n2: a.n2, act: a.act })[key];
    const daModules = daChunks.map((chunk) =>
      chunk.modules.map(({ layer: i, role }): LoraDaModule => {
        const linear = (model.layers[i] as Layer).linears[role] as Linear;
        const t = lora.get(linear.module.name) as LoraTrainable;
        const x = input(fwd.layers[i] as LayerActivations, loraInputKey(role));
        return { x, g: s.get(`layer${i}.${role}.lora_g`), da: t.da, scale: t.scale };
      }),
    );
    // Which chunk's dispatch forms a projection's dA (`${layer}.${role}`), for the chunks it can take.
    const daOn = daModules.map((modules) => loraDaManyRefusal(ctx, modules) === undefined);
    const inChunk = loraDaChunkOf(daChunks);
    const deferredDa = (i: number, role: LinearRole) => {
      const ci = inChunk(i, loraInputKey(role));
      return ci !== undefined && daOn[ci] ? ci : undefined;
    };
    /** A projection's g: its place in its chunk's arena where it is in a chunk (also where the chunk
     * was refused and its dA falls back to the layer's dispatches), else its rank's slot. */
    const gOf = (i: number, role: LinearRole, r: number, slot: number) =>
      inChunk(i, loraInputKey(role)) !== undefined ? s.get(`layer${i}.${role}.lora_g`) : g(r, slot);

    const normBackward = async (
      norm: Norm,
      x: Tensor,
      stats: NormStats,
      dy: Tensor,
      dx: Tensor,
      accumulate: boolean,
      label: string,
    ) => {
      const eps = c.norm.eps;
      if (c.norm.kind === 'layer') {
        return planLayerNormBackward(
          ctx,
          { x, w: norm.w, mean: stats.mean as Tensor, rstd: stats.rstd, dy, dx },
          { eps, accumulate, label },
        );
      }
      return planRmsNormBackward(ctx, { x, w: norm.w, rstd: stats.rstd, dy, dx }, { eps, accumulate, label });
    };

    // Adapted projections of the layer in a shared-input group whose dA are one dispatch
    // (sharedLoraGroups): each keeps its g in its own slot until flushShared plans that dispatch.
    let shared: LinearRole[] = [];
    let pendingDA: { l: Tensor; out: Tensor; R: number; alpha: number; beta: number }[] = [];
    const flushShared = async (x: Tensor, label: string) => {
      if (pendingDA.length === 0) return;
      out.push(await planLoraColsMulti(ctx, x, pendingDA, { T: rows, N: x.shape[1] as number }, label));
      pendingDA = [];
    };

    /** dx (+)= dy·W for one projection, and the LoRA gradients when it is adapted. */
    const linearBackward = async (
      layer: Layer,
      a: LayerActivations,
      role: LinearRole,
      x: Tensor,
      dy: Tensor,
      dx: Tensor | undefined,
      accumulate: boolean,
      activation?: MatmulActivationBackward,
      extra?: MatmulOptions['extra'],
      gdBPlanned = false,
      lowRanks: readonly { g: Tensor; a: Tensor; scale: number }[] = [],
    ) => {
      const lin = layer.linears[role] as Linear;
      const t = lora.get(lin.module.name);
      // No dx wanted (the lowest adapted layer's input, which nothing upstream needs): an adapted
      // projection still gets its LoRA gradients, an unadapted one nothing.
      if (!dx && !t) return;
      if (t) {
        const h = a.loraH.get(role) as Tensor;
        const d = loraDropout(t, fwd.dropout, x);
        const r = t.a.shape[0] as number;
        const slot = shared.indexOf(role);
        const gr = gOf(layer.index, role, r, Math.max(0, slot));
        // Its dA: in its chunk's dispatch (deferredDa), the group's (flushShared), or its own.
        const later = deferredDa(layer.index, role) !== undefined;
        if (slot >= 0 && !later) pendingDA.push({ l: gr, out: t.da, R: r, alpha: t.scale, beta: 1 });
        out.push(
          ...(await planLoraBackward(
            ctx,
            { w0: lin.w, a: t.a, b: t.b, bias: lin.bias, scale: t.scale },
            { x, h, dy, g: gr, ...(dx ? { dx } : {}), da: t.da, db: t.db, ...(d ? { dropout: d } : {}) },
            {
              accumulateDx: accumulate,
              accumulateGrads: true,
              fuse: fwd.fuse,
              gdBMaxRank,
              gdB: !gdBPlanned,
              dA: slot < 0 && !later,
              dxActivation: dx ? activation : undefined,
              dxExtra: dx ? extra : undefined,
              dxLowRank2: dx ? lowRanks[0] : undefined,
              dxLowRank3: dx ? lowRanks[1] : undefined,
              dxTileMath: gradTiles,
            },
            lin.module.name,
          )),
        );
      } else {
        out.push(
          await planMatmul(
            ctx,
            dy,
            lin.w,
            dx as Tensor,
            gradTileOptions(lin.w, {
              transW: false,
              beta: accumulate ? 1 : 0,
              activationBackward: activation,
              extra,
              label: `${lin.module.name}.dx`,
            }),
          ),
        );
      }
    };

    /** dx = Σ dy·W (and the LoRA gradients) of projections that read the same input x, in
     * dxSteps' dispatches; their shared dA last. */
    const groupBackward = async (
      layer: Layer,
      a: LayerActivations,
      parts: readonly (readonly [LinearRole, Tensor])[],
      x: Tensor,
      dx: Tensor | undefined,
      label: string,
    ) => {
      const roles = parts.map(([role]) => role);
      const dy = new Map(parts);
      const adapted = new Set(a.loraH.keys());
      shared = groups(a).find((g) => g.every((r) => roles.includes(r))) ?? [];
      // The shared projections' g and dB in one dispatch where that pays (loraGradPairPays): three
      // in lora_g_db_many, else two to a lora_g_db_pair; before any dx reads a g. Each has a g place
      // of its own, and the trainer's B and dB are places in two arenas (loraGradPairable).
      const gdBPlanned = new Set<LinearRole>();
      const gradModule = (role: LinearRole): LoraGradModule => {
        const t = lora.get((layer.linears[role] as Linear).module.name) as LoraTrainable;
        const r = t.a.shape[0] as number;
        const h = a.loraH.get(role) as Tensor;
        const gr = gOf(layer.index, role, r, shared.indexOf(role));
        return { dy: dy.get(role) as Tensor, b: t.b, h, g: gr, db: t.db, scale: t.scale };
      };
      // q, k and v all adapted: their three g and dB in one dispatch where every operand kind lies
      // in one buffer (lora_g_db_many), instead of a pair and one alone.
      const many = shared.length === 3 && pairGdB ? shared.map(gradModule) : [];
      if (many.length === 3 && loraGradManyRefusal(many) === undefined) {
        out.push(await planLoraGradGdBMany(ctx, many, rows, 1, `${label}.lora_g_dB.${shared.join('_')}`));
        for (const role of shared) gdBPlanned.add(role);
      }
      for (let i = 0; pairGdB && gdBPlanned.size === 0 && i + 1 < shared.length; i += 2) {
        const pair = [shared[i], shared[i + 1]] as [LinearRole, LinearRole];
        const mods = pair.map(gradModule) as [LoraGradModule, LoraGradModule];
        if (!loraGradPairable(...mods)) continue;
        out.push(await planLoraGradGdBPair(ctx, mods, rows, 1, `${label}.lora_g_dB.${pair.join('_')}`));
        for (const role of pair) gdBPlanned.add(role);
      }
      const sumLr = fwd.fuse && fwd.dropout === undefined;
      const w = (role: LinearRole) => (layer.linears[role] as Linear).w;
      const trainable = (role: LinearRole) => lora.get((layer.linears[role] as Linear).module.name);
      // A dispatch of dxSteps: the first adapted projection's LoRA dx (or the first one's plain dx)
      // carries the others' dy·W and the second adapted one's LoRA term.
      const split = (step: readonly LinearRole[]) => {
        const first = step.find((r) => adapted.has(r)) ?? (step[0] as LinearRole);
        const others = step.filter((r) => r !== first);
        const [lora2, lora3] = others.filter((r) => adapted.has(r));
        return { first, others, lora2, lora3 };
      };
      // matmul_sum_lr binds the places whole: two dy in one buffer (the attention gradients'), the
      // two A in one (the trainer's parameters' arena), the g in the g arena. Where they are not
      // (a caller's own tensors), the group falls back to projectionSteps' dispatches.
      const fits = (step: readonly LinearRole[]) => {
        const { first, others, lora2, lora3 } = split(step);
        const dys = others.map((r) => dy.get(r) as Tensor);
        const sameDy = dys.length < 2 || dys[0]?.buffer === dys[1]?.buffer;
        const sameA = [lora2, lora3].every((r) => !r || trainable(r)?.a.buffer === trainable(first)?.a.buffer);
        return sameDy && sameA;
      };
      let steps = dxSteps(roles, adapted, sumLr, sumLr);
      if (!steps.every(fits)) steps = dxSteps(roles, adapted, false, sumLr);
      for (const [i, step] of steps.entries()) {
        const { first, others, lora2, lora3 } = split(step);
        const [o1, o2] = others;
        // The other adapted projections' g (and dB; dA with the group's) before the dx reads them.
        const lowRanks: { g: Tensor; a: Tensor; scale: number }[] = [];
        for (const role of [lora2, lora3]) {
          if (!role) continue;
          await linearBackward(
            layer,
            a,
            role,
            x,
            dy.get(role) as Tensor,
            undefined,
            false,
            undefined,
            undefined,
            gdBPlanned.has(role),
          );
          const t = trainable(role) as LoraTrainable;
          const r = t.a.shape[0] as number;
          lowRanks.push({ g: gOf(layer.index, role, r, shared.indexOf(role)), a: t.a, scale: t.scale });
        }
        const extra = o1 && {
          a: dy.get(o1) as Tensor,
          w: w(o1),
          ...(o2 ? { third: { a: dy.get(o2) as Tensor, w: w(o2) } } : {}),
        };
        await linearBackward(
          layer,
          a,
          first,
          x,
          dy.get(first) as Tensor,
          dx,
          i > 0,
          undefined,
          extra,
          gdBPlanned.has(first),
          lowRanks,
        );
      }
      await flushShared(x, `${label}.lora_dA.${shared.join('_')}`);
      shared = [];
    };
    const groups = (a: LayerActivations) =>
      sharedLoraGroups(c, new Set(a.loraH.keys()), fwd.dropout !== undefined, fwd.fuse);

    const last = fwd.layers[fwd.layers.length - 1] as LayerActivations;
    out.push(await normBackward(model.finalNorm, last.out, fwd.finalStats, dHidden, dResid, false, 'final_norm'));

    const replayed = new Set<Dispatch>();
    // Nothing upstream of the lowest adapted layer's input needs a gradient (the embedding is
    // frozen): the layers below it get no backward, and its own input no dx (lowestAdaptedLayer).
    const lowest = lowestAdaptedLayer(c, ranks);
    const folded = norm1Folds(c, ranks, rows, fwd.fuse, normInDx, fwd.recompute, fwd.dropout !== undefined);
    // The norm1 backward of the layer above, when it runs in this layer's down dx (norm1InDownDx).
    let pendingNorm1: { dn: Tensor; x: Tensor; w: Tensor; rstd: Tensor } | undefined;
    for (let i = c.numLayers - 1; i >= lowest; i--) {
      const layer = model.layers[i] as Layer;
      const a = fwd.layers[i] as LayerActivations;
      const p = `layer${i}`;
      const dInput = i > lowest ? dNorm : undefined;
      if (fwd.recompute && i < c.numLayers - 1) {
        // The shared activations hold the last layer's forward: rerun this layer's (from its
        // saved input) before differentiating it. The forward plan owns these dispatches.
        for (const dsp of fwd.layerDispatches[i] ?? []) {
          out.push(dsp);
          replayed.add(dsp);
        }
      }
      // MLP: out = mid + down(act(...)); dResid holds ∂L/∂out. Fused, the down projection's dx
      // kernel stores the nonlinearity's backward itself (not with dropout on down, whose dx is
      // three dispatches).
      const downLora = lora.get((layer.linears.down as Linear).module.name);
      const actInDown = fwd.fuse && !(downLora && fwd.dropout);
      if (c.family === 'gpt2') {
        if (actInDown) {
          await linearBackward(layer, a, 'down', a.act, dResid, dGate, false, { kind: 'gelu', pre: a.gate });
        } else {
          await linearBackward(layer, a, 'down', a.act, dResid, dAct as Tensor, false);
          out.push(await planGeluNewBackward(ctx, { x: a.gate, dy: dAct as Tensor, dx: dGate }, `${p}.gelu`));
        }
        await linearBackward(layer, a, 'fc', a.n2, dGate, dNorm, false);
      } else if (pendingNorm1) {
        // ∂L/∂x of the layer above = ∂L/∂mid + its norm1's backward, formed as the down dx stages
        // ∂L/∂out (which it is) into the other buffer; ∂L/∂act goes to gate and up's dx, which form
        // silu·mul's backward as they stage it.
        if (!dResidOther || !dAct)
          throw new Error(`${p}: backwardLayout allocated no d_resid_next or d_act for norm1's backward in down's dx`);
        const down = layer.linears.down as Linear;
        const nb = { ...pendingNorm1, dMid: dResidOther };
        out.push(
          await planMatmul(
            ctx,
            dResid,
            down.w,
            dAct,
            gradTileOptions(down.w, { transW: false, normBackward: nb, label: `${down.module.name}.dx` }),
          ),
        );
        [dResid, dResidOther] = [dResidOther, dResid];
        pendingNorm1 = undefined;
        const gate = layer.linears.gate as Linear;
        const upW = (layer.linears.up as Linear).w;
        const gb = { gate: a.gate, up: a.up as Tensor, w3: upW };
        out.push(
          await planMatmul(
            ctx,
            dAct,
            gate.w,
            dNorm,
            gradTileOptions(gate.w, { transW: false, gluBackward: gb, label: `${p}.gate_up.dx` }),
          ),
        );
      } else {
        const up = a.up as Tensor;
        if (actInDown) {
          const silu = { kind: 'silu_mul' as const, gate: a.gate, up, dup: dUp as Tensor };
          await linearBackward(layer, a, 'down', a.act, dResid, dGate, false, silu);
        } else {
          await linearBackward(layer, a, 'down', a.act, dResid, dAct as Tensor, false);
          out.push(
            await planSiluMulBackward(
              ctx,
              { gate: a.gate, up, dout: dAct as Tensor, dgate: dGate, dup: dUp as Tensor },
              `${p}.silu_mul`,
            ),
          );
        }
        await groupBackward(
          layer,
          a,
          [
            ['gate', dGate],
            ['up', dUp as Tensor],
          ],
          a.n2,
          dNorm,
          p,
        );
      }
      // The residual: ∂L/∂mid = ∂L/∂out + norm2's backward, added in place; or formed in o's dx
      // prologue into the other buffer, which then holds the residual gradient.
      if (norm2InODx(c, new Set(a.loraH.keys()), rows, fwd.fuse, normInDx)) {
        // backwardLayout allocates it by the same test; without it the count would silently differ.
        if (!dResidOther)
          throw new Error(`${p}: backwardLayout allocated no d_resid_next for norm2's backward in o's dx`);
        const o = layer.linears.o as Linear;
        const nb = { dn: dNorm, x: a.mid, w: layer.norm2.w, rstd: a.n2Stats.rstd, dMid: dResidOther };
        out.push(
          await planMatmul(
            ctx,
            dResid,
            o.w,
            dAttn,
            gradTileOptions(o.w, { transW: false, normBackward: nb, label: `${o.module.name}.dx` }),
          ),
        );
        [dResid, dResidOther] = [dResidOther, dResid];
      } else {
        out.push(await normBackward(layer.norm2, a.mid, a.n2Stats, dNorm, dResid, true, `${p}.norm2`));
        // Attention: mid = x + o(attention(q, k, v)).
        await linearBackward(layer, a, 'o', a.attn, dResid, dAttn, false);
      }
      const dims = { B, Tq: T, Tk: T, pos0: 0, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim };
      if (c.family === 'gpt2') {
        const qkv = a.qkv as Tensor;
        const layouts = fusedQkvLayout({ T, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim });
        out.push(
          ...(await planAttentionBackward(
            ctx,
            {
              q: qkv,
              k: qkv,
              v: qkv,
              o: a.attn,
              lse: a.lse,
              do: dAttn,
              dq,
              dk,
              dv,
              ...(delta ? { delta } : {}),
              variant: attention,
              dims: { ...dims, ...layouts },
              tileMath: fwd.attentionTileMath,
              gradTileMath: attentionGradTiles,
            },
            `${p}.attention`,
            { fuse: fwd.fuse },
          )),
        );
        // Interleave dq, dk, dv back into c_attn's [rows, 3d] layout: one dispatch, or a copy each.
        if (fwd.fuse) {
          out.push(await planInterleave3(ctx, [dq, dk, dv], dqkv as Tensor, { rows, cols: d }, `${p}.dqkv`));
        } else {
          for (const [j, src] of [dq, dk, dv].entries()) {
            out.push(
              await planCopyRows(
                ctx,
                src,
                zero as Tensor,
                dqkv as Tensor,
                { rows, cols: d, dstStride: 3 * d, dstOffset: j * d },
                0,
                `${p}.dqkv${j}`,
              ),
            );
          }
        }
        await linearBackward(layer, a, 'qkv', a.n1, dqkv as Tensor, dInput, false);
      } else {
        // RoPE's backward: inside the attention kernels when they take it, else after them.
        const rope = { headDim: c.headDim, T, pos0: 0, attentionScaling: model.ropeAttentionScaling };
        const invFreq = model.ropeInvFreq as Tensor;
        const ropeInside = ropeInAttentionBackward(c, fwd.fuse);
        const invFreqValues = model.ropeInvFreqValues;
        if (ropeInside && !invFreqValues) throw new Error('the model has no RoPE frequencies on the host');
        out.push(
          ...(await planAttentionBackward(
            ctx,
            {
              q: a.q as Tensor,
              k: a.k as Tensor,
              v: a.v as Tensor,
              o: a.attn,
              lse: a.lse,
              do: dAttn,
              dq,
              dk,
              dv,
              ...(delta ? { delta } : {}),
              variant: attention,
              dims,
              tileMath: fwd.attentionTileMath,
              gradTileMath: attentionGradTiles,
              ...(ropeInside && invFreqValues
                ? { rope: { invFreq: invFreqValues, scaling: model.ropeAttentionScaling } }
                : {}),
            },
            `${p}.attention`,
            { fuse: fwd.fuse },
          )),
        );
        if (!ropeInside && fwd.fuse) {
          const k = { x: dk, nHeads: c.numKvHeads };
          out.push(
            await planRopeBackward(ctx, dq, invFreq, { ...rope, nHeads: c.numHeads, with: k, label: `${p}.rope` }),
          );
        } else if (!ropeInside) {
          out.push(
            await planRopeBackward(ctx, dq, invFreq, { ...rope, nHeads: c.numHeads, label: `${p}.rope_q` }),
            await planRopeBackward(ctx, dk, invFreq, { ...rope, nHeads: c.numKvHeads, label: `${p}.rope_k` }),
          );
        }
        let dqIn = dq;
        let dkIn = dk;
        if (c.qkNorm) {
          const eps = c.norm.eps;
          const qs = a.qNormStats as NormStats;
          const ks = a.kNormStats as NormStats;
          out.push(
            await planRmsNormBackward(
              ctx,
              { x: a.qRaw as Tensor, w: layer.qNorm as Tensor, rstd: qs.rstd, dy: dq, dx: dqRaw as Tensor },
              { eps, groups: c.numHeads, label: `${p}.q_norm` },
            ),
            await planRmsNormBackward(
              ctx,
              { x: a.kRaw as Tensor, w: layer.kNorm as Tensor, rstd: ks.rstd, dy: dk, dx: dkRaw as Tensor },
              { eps, groups: c.numKvHeads, label: `${p}.k_norm` },
            ),
          );
          dqIn = dqRaw as Tensor;
          dkIn = dkRaw as Tensor;
        }
        await groupBackward(
          layer,
          a,
          [
            ['q', dqIn],
            ['k', dkIn],
            ['v', dv],
          ],
          a.n1,
          dInput,
          p,
        );
      }
      // ∂L/∂x = ∂L/∂mid + norm1's backward: dResid becomes the previous layer's ∂L/∂out. Or the
      // layer below's down dx forms it (norm1InDownDx).
      if (dInput && folded[i]) pendingNorm1 = { dn: dNorm, x: a.x, w: layer.norm1.w, rstd: a.n1Stats.rstd };
      else if (dInput) out.push(await normBackward(layer.norm1, a.x, a.n1Stats, dNorm, dResid, true, `${p}.norm1`));
      // The dA of every chunk whose lowest layer this is: all its g are formed now.
      for (const [ci, chunk] of daChunks.entries()) {
        if (chunk.layers[0] === i && daOn[ci])
          out.push(await planLoraDaMany(ctx, daModules[ci] ?? [], { T: rows, beta: 1, label: `lora_dA.${ci}` }));
      }
    }
    const scratchBytes = s.owned.reduce((n, t) => n + t.byteLength, 0) + ce.scratchBytes;
    const plan = ce;
    return {
      labels,
      loss,
      errors,
      crossEntropy: plan,
      dispatches: out,
      scratchBytes,
      dispose() {
        for (const x of new Set(out)) if (!plan.dispatches.includes(x) && !replayed.has(x)) x.dispose();
        plan.dispose();
        for (const t of s.owned) t.dispose();
      },
    };
  } catch (e) {
    for (const x of new Set(out)) if (!ce?.dispatches.includes(x) && !fwd.dispatches.includes(x)) x.dispose();
    ce?.dispose();
    for (const t of s.owned) t.dispose();
    throw e;
  }
}

/** The model's input for a batch: ids, and the shifted targets the loss reads. */
export function shiftLabels(labels: ArrayLike<number>, B: number, T: number): Int32Array {
  const out = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) out[b * T + t] = t + 1 < T ? (labels[b * T + t + 1] as number) : -100;
  }
  return out;
}
