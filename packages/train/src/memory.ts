/**
 * GPU memory of a LoRA training run, computed from the shapes before anything is allocated, and
 * the preflight check that refuses a run the device cannot hold.
 *
 * The estimate lists every buffer LoraTrainer allocates, from the same descriptions the planners
 * allocate from (no second copy of their formulas): a buffer is its elements rounded up to 16 bytes
 * (at least 16). Categories are those of `trainer.memory`:
 *
 *   frozenWeights  the checkpoint's tensors on the GPU (matrices at `precision`, norms and biases
 *                  f32, RoPE's inverse frequencies): what loadModel allocated (model.bytes)
 *   trainable      4 arenas (parameters, gradients, AdamW m and v) in loraArenaLayout: each matrix
 *                  at a multiple of max(16, minStorageBufferOffsetAlignment) bytes
 *   activations    @webtune/models' forwardLayout in 'train' mode: per layer its input and what the
 *                  backward reads (norm statistics, q/k/v, the attention output and log-sum-exp,
 *                  the MLP's gate/up, the residual stream after attention, LoRA's h, and a norm's
 *                  output or the MLP activation only when an adapted projection reads it); what
 *                  the backward never reads is one buffer shared by all layers. With `recompute`,
 *                  every layer keeps only its input and LoRA's h.
 *   scratch        backwardLayout (one layer's worth of gradients), the loss's logits chunk
 *                  [rows, chunk] (core's crossEntropyScratchBytes), and trainerBuffers (inputs,
 *                  loss log, gradient norm and its partials, AdamW's latch, the step reports)
 *
 * Uniform buffers (the parameters of every dispatch) are counted from forwardDispatchCount and
 * backwardDispatchCount, the planners' own counts (checked against a real step's runtime count in
 * the trainer tests), at a nominal 48 bytes each: a few KiB per layer.
 *
 * What to show before training (the studio's preflight panel):
 *  - the total next to the four categories, e.g. "weights 258 MiB · adapter + optimizer 7 MiB ·
 *    activations 1.1 GiB · scratch 80 MiB = 1.4 GiB", and the trainable parameter count;
 *  - the largest single buffer against the device's maxStorageBufferBindingSize (and
 *    maxBufferSize), since that, not the total, is what WebGPU refuses outright;
 *  - when checkFits fails: its message (which buffer, how big, the limit) and what helps: a smaller
 *    batch or seq (activations scale with batch·seq), `recompute` (activations ÷ ~L), f16 weights,
 *    fewer target modules or a lower r (trainable), gradient accumulation instead of a bigger batch;
 *  - the total against a budget when the app has one (WebGPU does not report free VRAM; the studio
 *    may take a user setting or a fraction of navigator.deviceMemory), as a warning if over.
 */
import {
  alignUp,
  attentionUniformBytes,
  bytesPerElement,
  crossEntropyScratchBytes,
  crossEntropyTrainingDispatchCount,
  type DType,
  formatBytes,
  type GpuContext,
  isCpuAdapter,
  LimitExceededError,
  LORA_DA_UNIFORM_BYTES,
  loraGdBMaxRankFor,
  ShapeError,
  splitRowCounts,
  type TileMath,
  tablePartLimit,
  WebtuneError,
} from '@webtune/core';
import {
  attentionBackwardDispatches,
  backwardDispatchCount,
  backwardLayout,
  forwardDispatchCount,
  forwardLayout,
  loraDaChunks,
  loraDaDeferred,
  lowestAdaptedLayer,
  type ModelConfig,
  modelLayout,
  namedModules,
  parameterTable,
  type StoredAsReason,
  storedAs,
  type WeightPrecision,
} from '@webtune/models';
import { defaultTrainingTileMath, loraArenaLayout, trainerBuffers } from './layout.js';
import { type ResolvedLora, resolveLoraTargets, validateLoraConfig } from './lora/index.js';

export type MemoryCategory = 'frozenWeights' | 'trainable' | 'activations' | 'scratch';

/** One kind of buffer in the estimate. */
export interface EstimatedBuffer {
  /** The label the allocation carries ('train.layer{i}.gate' for one per layer). */
  readonly label: string;
  readonly category: MemoryCategory;
  /** 'uniform' entries stand for many small dispatch parameter buffers (counted, not checked
   * against the storage limits). */
  readonly kind: 'storage' | 'uniform';
  readonly shape: readonly number[];
  readonly dtype: DType;
  /** Frozen weights not at the run's precision: why (an embedding or the LM head stays f16 at
   * q8_0 and q4_0, and so does a linear weight whose input size is not a multiple of 32). */
  readonly note?: StoredAsReason;
  /** Bytes of one buffer as allocated (elements rounded up to 16 bytes). */
  readonly bytes: number;
  /** How many such buffers (one per layer, one per micro-batch ...). */
  readonly count: number;
}

export interface MemoryEstimate {
  /** Bytes by category (as LoraTrainer's `memory` reports them). */
  readonly frozenWeights: number;
  readonly trainable: number;
  readonly activations: number;
  readonly scratch: number;
  readonly total: number;
  /** The biggest single storage buffer (the one that meets the binding limit first). */
  readonly largestBuffer: EstimatedBuffer;
  readonly buffers: readonly EstimatedBuffer[];
  readonly settings: {
    readonly batch: number;
    readonly seq: number;
    readonly gradAccum: number;
    readonly recompute: boolean;
    readonly precision: WeightPrecision;
    /** batch·seq. */
    readonly rows: number;
    /** Vocabulary rows per chunk of the loss. */
    readonly lossChunk: number;
    /** Compute dispatches of one optimizer step (all micro-batches), as the planners will record
     * them (a trainer's runtime count is checked against it in the tests). */
    readonly dispatchesPerStep: number;
    readonly adaptedModules: number;
    readonly trainableParameters: number;
  };
}

/** The device facts the plan depends on (a GpuContext's limits and adapter, or defaults). */
export interface MemoryLimits {
  readonly maxBufferSize: number;
  readonly maxStorageBufferBindingSize: number;
  readonly minStorageBufferOffsetAlignment: number;
  readonly maxComputeInvocationsPerWorkgroup: number;
  readonly maxComputeWorkgroupSizeX: number;
}

/** WebGPU's default limits (what a device gets when nothing more is asked for). */
export const WEBGPU_DEFAULT_LIMITS: MemoryLimits = Object.freeze({
  maxBufferSize: 268_435_456,
  maxStorageBufferBindingSize: 134_217_728,
  minStorageBufferOffsetAlignment: 256,
  maxComputeInvocationsPerWorkgroup: 256,
  maxComputeWorkgroupSizeX: 256,
});

export interface MemoryEstimateOptions {
  readonly batch: number;
  readonly seq: number;
  /** Micro-batches per optimizer step (each has its own input buffers). Default 1. */
  readonly gradAccum?: number;
  /** Per-layer activation recomputation. Default false. */
  readonly recompute?: boolean;
  /** Frozen matrices on the GPU (loadModel's `precision`). Default 'f16'. */
  readonly precision?: WeightPrecision;
  /** The device the run is planned for: its limits size the loss chunk, the arena alignment and
   * the gradient-norm scratch exactly as the trainer will. */
  readonly device?: GpuContext;
  /** Without `device`: the limits to assume (default WEBGPU_DEFAULT_LIMITS) ... */
  readonly limits?: Partial<MemoryLimits>;
  /** ... and whether it is a software adapter (smaller reductions). Default false. */
  readonly cpuAdapter?: boolean;
  /** The most bytes one part of a split embedding or LM head takes (a loaded model's
   * tablePartBytes). Default: the smaller of the binding and buffer limits. */
  readonly tablePartBytes?: number;
  /** Tensors stored otherwise than `precision` says (a loaded GGUF model's storedDTypes). */
  readonly storedDTypes?: ReadonlyMap<string, DType>;
  /** Fused kernels (TrainerOptions.fuse). Default true. */
  readonly fuse?: boolean;
  /** TrainerOptions.tileMath: 'f16' scales the loss (the scale's state, one more optimizer
   * dispatch). Default the trainer's (defaultTrainingTileMath). */
  readonly tileMath?: TileMath;
}

/** The limits given, by name (a GPUSupportedLimits object keeps them as getters, which a spread
 * would not copy), over WebGPU's defaults. */
function pickLimits(given: Partial<MemoryLimits> | undefined): MemoryLimits {
  const out: Record<string, number> = { ...WEBGPU_DEFAULT_LIMITS };
  for (const key of Object.keys(WEBGPU_DEFAULT_LIMITS) as (keyof MemoryLimits)[]) {
    const v = given?.[key];
    if (typeof v === 'number') out[key] = v;
  }
  return out as unknown as MemoryLimits;
}

function isResolved(lora: unknown): lora is ResolvedLora {
  return typeof lora === 'object' && lora !== null && 'modules' in lora && 'config' in lora;
}

/** Bytes of a buffer of `n` elements of `bytesPer` bytes, as the context allocates it. */
function allocated(n: number, bytesPer: number): number {
  return Math.max(16, alignUp(n * bytesPer, 16));
}

function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

// Nominal size of a dispatch's uniform parameters (attention's apart): the matmul family's struct
// takes 160 bytes (it carries matmul_sum_lr's places and second terms, matmul_qkv's places), most
// other kernels' 48, a few 16 to 208 (lora_matmul's four roles); matmuls are about half of a step's
// dispatches. Uniform buffers are a few KiB per layer, well under 1 % of any run but the tiny
// fixtures'.
const U_NOMINAL = 96;

/**
 * The GPU memory a LoraTrainer for this model and configuration will allocate, by category and
 * buffer. `lora` is a PEFT LoraConfig (or any input validateLoraConfig accepts) or targets already
 * resolved on this model.
 */
/**
 * Checks batch, seq and gradAccum of a training run on this model (positive integers, seq within
 * the context) and returns them with gradAccum defaulted; `op` names the caller in the error.
 */
export function checkTrainingShape(
  op: string,
  config: ModelConfig,
  shape: { batch: number; seq: number; gradAccum?: number },
): { B: number; T: number; K: number } {
  const B = shape.batch;
  const T = shape.seq;
  const K = shape.gradAccum ?? 1;
  for (const [name, v] of [
    ['batch', B],
    ['seq', T],
    ['gradAccum', K],
  ] as const) {
    if (!Number.isSafeInteger(v) || v < 1)
      throw new WebtuneError(`${op}: ${name} must be a positive integer, got ${v}`);
  }
  if (T > config.maxPositions)
    throw new ShapeError(`${op}: seq ${T} exceeds the model's context of ${config.maxPositions}`);
  return { B, T, K };
}

export function estimateMemory(config: ModelConfig, lora: unknown, options: MemoryEstimateOptions): MemoryEstimate {
  const { B, T, K } = checkTrainingShape('estimateMemory', config, options);
  const recompute = options.recompute ?? false;
  const precision = options.precision ?? 'f16';
  const ctx = options.device;
  const limits: MemoryLimits = ctx ? (ctx.limits as unknown as MemoryLimits) : pickLimits(options.limits);
  const resolved = isResolved(lora)
    ? lora
    : resolveLoraTargets(validateLoraConfig(lora), namedModules(config), config.modelType);

  const buffers: EstimatedBuffer[] = [];
  const add = (
    category: MemoryCategory,
    label: string,
    shape: readonly number[],
    dtype: EstimatedBuffer['dtype'] = 'f32',
    count = 1,
    note?: StoredAsReason,
  ) => {
    if (count <= 0) return;
    const bytes = allocated(numel(shape), bytesPerElement(dtype));
    buffers.push({ label, category, kind: 'storage', shape, dtype, bytes, count, ...(note ? { note } : {}) });
  };
  const uniforms = (category: MemoryCategory, label: string, dispatches: number, bytes: number) => {
    if (dispatches > 0)
      buffers.push({ label, category, kind: 'uniform', shape: [], dtype: 'u32', bytes, count: dispatches });
  };

  // Frozen weights: loadModel's table; the embedding and the LM head in parts of whole rows when
  // they are larger than one binding (or buffer) may be.
  const layout = modelLayout(config);
  let headParts = [config.vocabSize];
  let embedParts = 1;
  for (const p of parameterTable(config)) {
    const given = options.storedDTypes?.get(p.key);
    const rule = storedAs(p, precision);
    const stored = given ? { dtype: given, reason: given === rule.dtype ? rule.reason : undefined } : rule;
    const note = stored.reason === 'always f32' ? undefined : stored.reason;
    const shape = p.transpose ? [p.shape[1] as number, p.shape[0] as number] : p.shape;
    if (p.key === layout.embed || p.key === layout.lmHead) {
      const [rows, cols] = shape as [number, number];
      const counts = splitRowCounts(rows, cols, stored.dtype, options.tablePartBytes ?? tablePartLimit(limits));
      if (p.key === (layout.lmHead ?? layout.embed)) headParts = counts;
      if (p.key === layout.embed) embedParts = counts.length;
      for (const n of new Set(counts)) {
        const same = counts.filter((c) => c === n).length;
        const label = counts.length === 1 ? p.key : `${p.key} (part of ${counts.length})`;
        add('frozenWeights', label, [n, cols], stored.dtype, same, note);
      }
      continue;
    }
    add('frozenWeights', p.key, shape, stored.dtype, 1, note);
  }
  if (config.rope) add('frozenWeights', 'rope.inv_freq', [config.headDim / 2]);

  // Trainable: four arenas of identical layout.
  const arena = loraArenaLayout(resolved.modules, limits.minStorageBufferOffsetAlignment);
  let trainableParameters = 0;
  for (const m of resolved.modules) trainableParameters += numel(m.aShape) + numel(m.bShape);
  for (const label of ['lora.params', 'lora.grads', 'adamw.exp_avg', 'adamw.exp_avg_sq']) {
    add('trainable', label, [arena.elements]);
  }

  // Activations: the train-mode forward plan's own layout (forwardLayout is what planForward
  // allocates from).
  const c = config;
  const rows = B * T;
  const ranks = new Map(resolved.modules.map((m) => [m.name, m.r]));
  const A = 'activations';
  // One entry per kind: the per-layer buffers of the same shape under 'layer{i}.' with a count.
  const kinds = new Map<string, { shape: readonly number[]; dtype: EstimatedBuffer['dtype']; count: number }>();
  // LoRA dropout: a scratch as wide as the widest adapted input, and the trainer's mask counters.
  const dropout = resolved.config.lora_dropout > 0 && resolved.modules.length > 0;
  const dropoutWidth = dropout ? Math.max(...resolved.modules.map((m) => m.aShape[1] as number)) : 0;
  for (const b of forwardLayout(c, ranks, { B, T, mode: 'train', recompute, dropoutWidth }).buffers) {
    const label = `train.${b.label.replace(/^layer\d+\./, 'layer{i}.')}`;
    const key = `${label} ${b.dtype}[${b.shape.join(',')}]`;
    const kind = kinds.get(key);
    if (kind) kind.count++;
    else kinds.set(key, { shape: b.shape, dtype: b.dtype, count: 1 });
  }
  for (const [key, k] of kinds) add(A, key.slice(0, key.indexOf(' ')), k.shape, k.dtype, k.count);
  const fuse = options.fuse ?? true;
  const cpu = ctx ? isCpuAdapter(ctx) : (options.cpuAdapter ?? false);
  // The fusions the device plans (layerFusions): all of them on GPUs, none on the CPU adapters.
  const fusions = { normInMlp: !cpu, loraHInMatmul: !cpu, qkvInOne: !cpu, ropeInProjections: !cpu };
  const forwardDispatches = forwardDispatchCount(c, ranks, rows, { dropout, embedParts, fuse, fusions });
  // Attention's parameters are larger (RoPE's frequencies ride in them): one dispatch per layer
  // forward, one to three backward (attentionBackwardDispatches) in the layers the backward reaches.
  const L = c.numLayers;
  const attention = { tiled: !cpu, maxBinding: limits.maxStorageBufferBindingSize };
  const attentionBackward = (L - lowestAdaptedLayer(c, ranks)) * attentionBackwardDispatches(c, rows, fuse, attention);
  uniforms(A, 'forward dispatch parameters', forwardDispatches - L, U_NOMINAL);
  uniforms(A, 'forward attention parameters', L, attentionUniformBytes());

  // Scratch: the backward plan's layout, the loss's logits chunk, the trainer's own buffers.
  const S = 'scratch';
  for (const b of backwardLayout(c, ranks, { B, T, dropout, fuse, normInDx: !cpu, attention, recompute }))
    add(S, `backward.${b.label}`, b.shape, b.dtype);
  const loss = crossEntropyScratchBytes({ limits }, rows, c.vocabSize);
  // The loss's chunks never straddle two parts of a split LM head.
  const chunks = headParts.reduce((n, part) => n + Math.ceil(part / loss.chunk), 0);
  add(S, 'loss.logits', [rows, loss.chunk]);
  add(S, 'loss.training.forward.stats', [rows, 4]);
  const lossScale = (options.tileMath ?? defaultTrainingTileMath(ctx, precision)) === 'f16';
  for (const b of trainerBuffers(K, rows, arena.elements, limits, cpu, dropout, lossScale))
    add(S, b.label, b.shape, b.dtype, b.count);
  const backwardDispatches = backwardDispatchCount(c, ranks, {
    rows,
    recompute,
    dropout,
    fuse,
    pairGdB: !cpu,
    gdBMaxRank: loraGdBMaxRankFor(cpu),
    normInDx: !cpu,
    attention,
    fusions,
    lossDispatches: crossEntropyTrainingDispatchCount(chunks, !cpu),
  });
  // The gradient norm (two dispatches), AdamW and with a scaled loss the scale's update.
  const optimizerDispatches = 3 + (lossScale ? 1 : 0);
  // LoRA's dA of a chunk of layers (loraDaChunks): 8 KiB of roles each.
  const daDispatches = loraDaDeferred(fuse, dropout, recompute) ? loraDaChunks(c, ranks, rows).length : 0;
  const nominal = backwardDispatches + optimizerDispatches - attentionBackward - daDispatches;
  uniforms(S, 'backward, loss and optimizer dispatch parameters', nominal, U_NOMINAL);
  uniforms(S, 'LoRA dA dispatch parameters', daDispatches, LORA_DA_UNIFORM_BYTES);
  uniforms(S, 'backward attention parameters', attentionBackward, attentionUniformBytes());

  const sum = (cat: MemoryCategory) =>
    buffers.filter((b) => b.category === cat).reduce((n, b) => n + b.bytes * b.count, 0);
  // model.bytes counts elements, not the 16-byte rounding of each buffer.
  const frozenWeights = buffers
    .filter((b) => b.category === 'frozenWeights')
    .reduce((n, b) => n + numel(b.shape) * bytesPerElement(b.dtype) * b.count, 0);
  const trainable = sum('trainable');
  const activations = sum('activations');
  const scratch = sum('scratch');
  let largest = buffers[0] as EstimatedBuffer;
  for (const b of buffers) if (b.kind === 'storage' && b.bytes > largest.bytes) largest = b;
  return {
    frozenWeights,
    trainable,
    activations,
    scratch,
    total: frozenWeights + trainable + activations + scratch,
    largestBuffer: largest,
    buffers,
    settings: {
      batch: B,
      seq: T,
      gradAccum: K,
      recompute,
      precision,
      rows,
      lossChunk: loss.chunk,
      dispatchesPerStep: K * (forwardDispatches + backwardDispatches) + optimizerDispatches,
      adaptedModules: resolved.modules.length,
      trainableParameters,
    },
  };
}

/** A setting of the run that makes it smaller when lowered (or, for recompute, turned on). */
export type PlanSetting = 'precision' | 'seq' | 'batch' | 'rank' | 'recompute';

/**
 * What to lower when `buffer` (or, without one, the total) is too big, most effective first:
 * weights shrink with a block precision (q8_0, then q4_0), activations and scratch with seq and
 * batch (and the total with recompute), the adapter and its optimizer state with the rank (or
 * fewer target modules).
 */
export function settingsToLower(estimate: MemoryEstimate, buffer?: EstimatedBuffer): PlanSetting[] {
  const s = estimate.settings;
  const smallerPrecision = s.precision !== 'q4_0';
  switch (buffer?.category) {
    case 'frozenWeights':
      return smallerPrecision ? ['precision'] : [];
    case 'trainable':
      return ['rank'];
    case 'activations':
    case 'scratch':
      return s.batch > 1 ? ['batch', 'seq'] : ['seq'];
    default: {
      const out: PlanSetting[] = [];
      if (!s.recompute) out.push('recompute');
      out.push(...(s.batch > 1 ? (['batch', 'seq'] as const) : (['seq'] as const)));
      if (smallerPrecision) out.push('precision');
      out.push('rank');
      return out;
    }
  }
}

const ADVICE: Record<PlanSetting, string> = {
  precision: 'a smaller --precision (q8_0, q4_0)',
  seq: 'a shorter sequence',
  batch: 'a smaller batch (gradient accumulation keeps the effective batch)',
  rank: 'a lower rank r or fewer target modules',
  recompute: 'recompute (activations of one layer at a time)',
};

/** "lower: a smaller batch ..., a shorter sequence" for an error message. */
export function describeSettings(settings: readonly PlanSetting[]): string {
  return settings.length === 0
    ? 'nothing to lower: this device cannot run it'
    : `try ${settings.map((k) => ADVICE[k]).join('; or ')}`;
}

/** A buffer of the plan is larger than the device allows, with the settings that shrink it. */
export class PlanTooLargeError extends LimitExceededError {
  constructor(
    limit: string,
    requested: number,
    allowed: number,
    what: string,
    readonly lower: readonly PlanSetting[],
  ) {
    super(limit, requested, allowed, what);
    this.message = `${this.message}: ${describeSettings(lower)}`;
  }
}

/** The total of a run went over the budget the caller gave. */
export class MemoryBudgetError extends LimitExceededError {
  /** What would shrink the run, most effective first. */
  readonly lower: readonly PlanSetting[];

  constructor(
    readonly estimate: MemoryEstimate,
    budget: number,
  ) {
    super('memoryBudget', estimate.total, budget, 'training');
    this.lower = settingsToLower(estimate);
    this.message =
      `training needs about ${formatBytes(estimate.total)} of GPU memory (${describeEstimate(estimate)}), ` +
      `over the budget of ${formatBytes(budget)}: ${describeSettings(this.lower)}`;
  }
}

/** "weights 1.2 MiB + adapter and optimizer ... + activations ... + scratch ..." */
export function describeEstimate(e: MemoryEstimate): string {
  return (
    `weights ${formatBytes(e.frozenWeights)} + adapter and optimizer ${formatBytes(e.trainable)} + ` +
    `activations ${formatBytes(e.activations)} + scratch ${formatBytes(e.scratch)}`
  );
}

export interface CheckFitsOptions {
  /** Bytes the whole run may take (WebGPU does not report free memory: the app decides). */
  readonly budget?: number;
}

/**
 * Throws before anything is allocated when the estimate cannot run on `ctx`: a PlanTooLargeError
 * (a LimitExceededError) naming the biggest buffer over maxBufferSize or
 * maxStorageBufferBindingSize (every buffer of a training run is bound as storage) and the
 * settings that shrink it, or a MemoryBudgetError when the total exceeds `budget`.
 */
export function checkFits(ctx: GpuContext, estimate: MemoryEstimate, options: CheckFitsOptions = {}): void {
  const l = ctx.limits;
  const storage = estimate.buffers.filter((b) => b.kind === 'storage');
  // The tighter limit first (usually the binding size): that is the one a buffer meets first.
  const checks = [
    ['maxStorageBufferBindingSize', l.maxStorageBufferBindingSize],
    ['maxBufferSize', l.maxBufferSize],
  ] as const;
  for (const [limit, allowed] of [...checks].sort((a, b) => a[1] - b[1])) {
    const over = storage.filter((b) => b.bytes > allowed).sort((a, b) => b.bytes - a.bytes);
    const worst = over[0];
    if (worst) {
      const others = over.reduce((n, b) => n + b.count, 0) - 1;
      const what =
        `${worst.label} ${worst.dtype}[${worst.shape.join(', ')}]` +
        (others > 0 ? ` (and ${others} more buffer${others === 1 ? '' : 's'} over the limit)` : '');
      throw new PlanTooLargeError(limit, worst.bytes, allowed, what, settingsToLower(estimate, worst));
    }
  }
  if (options.budget !== undefined && estimate.total > options.budget)
    throw new MemoryBudgetError(estimate, options.budget);
}
