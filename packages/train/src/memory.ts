/**
 * GPU memory of a LoRA training run, computed from the shapes before anything is allocated, and
 * the preflight check that refuses a run the device cannot hold.
 *
 * The estimate lists every buffer LoraTrainer allocates, with the same rules: a buffer is its
 * elements rounded up to 16 bytes (at least 16); the four LoRA arenas (A/B, their gradients, AdamW's
 * two moments) place each matrix at a multiple of max(16, minStorageBufferOffsetAlignment) bytes;
 * the loss runs over vocabulary chunks whose [rows, chunk] logits scratch fits the cross-entropy
 * budget (crossEntropyChunk). Categories are those of `trainer.memory`:
 *
 *   frozenWeights  the checkpoint's tensors on the GPU (matrices at `precision`, norms and biases
 *                  f32, RoPE's inverse frequencies): what loadModel allocated (model.bytes)
 *   trainable      4 arenas × Σ r·(in + out) f32: parameters, gradients, AdamW m and v
 *   activations    what the forward plan keeps for the backward. Per layer, rows = batch·seq:
 *                  the residual stream and norm outputs [rows, d], q/k/v and the attention output
 *                  [rows, nH·hd | nKV·hd], the MLP's gate/up/act [rows, I], the log-sum-exp
 *                  [batch, nH, seq], the norms' statistics [rows], LoRA's h [rows, r] per adapted
 *                  module. With `recompute`, every layer keeps only its input [rows, d] and its
 *                  LoRA h; one shared set of layer activations is recomputed in the backward, so
 *                  activations ≈ L·rows·d + one layer's activations.
 *   scratch        the backward's buffers shared across layers (one layer's worth of gradients),
 *                  the loss's logits chunk [rows, chunk], the inputs of each micro-batch, the loss
 *                  log, the gradient-norm partials, and the uniform buffers of every dispatch
 *
 * Uniform buffers (16-80 bytes per dispatch; ~60 dispatches per layer) are estimated from a
 * count of dispatches at nominal sizes; they are a few KiB per layer, well under 1 % of any real
 * run. Everything else is exact for the planner as written.
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
  CROSS_ENTROPY_DEFAULT_CHUNK,
  CROSS_ENTROPY_DEFAULT_SCRATCH_BYTES,
  crossEntropyChunk,
  formatBytes,
  type GpuContext,
  LimitExceededError,
  reducePartialsSize,
  ShapeError,
  WebtuneError,
} from '@webtune/core';
import { type ModelConfig, namedModules, parameterTable } from '@webtune/models';
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
  readonly dtype: 'f32' | 'f16' | 'i32' | 'u32';
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
    readonly precision: 'f16' | 'f32';
    /** batch·seq. */
    readonly rows: number;
    /** Vocabulary rows per chunk of the loss. */
    readonly lossChunk: number;
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
  readonly precision?: 'f16' | 'f32';
  /** The device the run is planned for: its limits size the loss chunk, the arena alignment and
   * the gradient-norm scratch exactly as the trainer will. */
  readonly device?: GpuContext;
  /** Without `device`: the limits to assume (default WEBGPU_DEFAULT_LIMITS) ... */
  readonly limits?: Partial<MemoryLimits>;
  /** ... and whether it is a software adapter (smaller reductions). Default false. */
  readonly cpuAdapter?: boolean;
}

function isResolved(lora: unknown): lora is ResolvedLora {
  return typeof lora === 'object' && lora !== null && 'modules' in lora && 'config' in lora;
}

const f32Bytes = (n: number) => n * 4;

/** Bytes of a buffer of `n` elements of `bytesPer` bytes, as the context allocates it. */
function allocated(n: number, bytesPer: number): number {
  return Math.max(16, alignUp(n * bytesPer, 16));
}

function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** The loss chunk without a device: core's crossEntropyChunk rule with default options. */
function lossChunk(rows: number, vocab: number, limits: MemoryLimits): number {
  const budget = Math.min(
    CROSS_ENTROPY_DEFAULT_SCRATCH_BYTES,
    limits.maxStorageBufferBindingSize,
    limits.maxBufferSize,
  );
  const fits = Math.floor(budget / (4 * rows));
  const want = Math.min(CROSS_ENTROPY_DEFAULT_CHUNK, vocab);
  if (want === vocab && vocab <= fits) return vocab;
  const chunk = Math.floor(Math.min(want, fits) / 4) * 4;
  if (chunk < 4) {
    throw new LimitExceededError('maxScratchBytes', 16 * rows, budget, `cross_entropy logits scratch [${rows}, 4]`);
  }
  return chunk;
}

/** Elements of the gradient-norm partials without a device: core's reducePlan rule. */
function partialsSize(n: number, limits: MemoryLimits, cpu: boolean): number {
  const cap = Math.min(cpu ? 64 : 256, limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX);
  let wg = 1;
  while (wg * 2 <= cap) wg *= 2;
  const maxGroups = (cpu ? 4 : 16) * wg;
  const perThread = Math.max(cpu ? 64 : 8, Math.ceil(n / (wg * maxGroups)));
  const groups = Math.max(1, Math.ceil(n / (wg * perThread)));
  return 2 * groups;
}

// Nominal uniform-buffer sizes (bytes) of the kernels' parameter structs.
const U_MATMUL = 48;
const U_THIN = 32; // LoRA's h, g, dA, dB and row copies
const U_ATTENTION = 80;
const U_ELEMENTWISE = 16;
const U_REDUCE = 16;

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
  const limits: MemoryLimits = ctx
    ? (ctx.limits as unknown as MemoryLimits)
    : { ...WEBGPU_DEFAULT_LIMITS, ...options.limits };
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
  ) => {
    if (count <= 0) return;
    const per = dtype === 'f16' ? 2 : 4;
    buffers.push({ label, category, kind: 'storage', shape, dtype, bytes: allocated(numel(shape), per), count });
  };
  const uniforms = (category: MemoryCategory, label: string, dispatches: number, bytes: number) => {
    if (dispatches > 0)
      buffers.push({ label, category, kind: 'uniform', shape: [], dtype: 'u32', bytes, count: dispatches });
  };

  // Frozen weights: loadModel's table.
  for (const p of parameterTable(config)) {
    const dtype = p.precision === 'f32' ? 'f32' : precision;
    const shape = p.transpose ? [p.shape[1] as number, p.shape[0] as number] : p.shape;
    add('frozenWeights', p.key, shape, dtype);
  }
  if (config.rope) add('frozenWeights', 'rope.inv_freq', [config.headDim / 2]);

  // Trainable: four arenas of identical layout.
  const align = Math.max(16, limits.minStorageBufferOffsetAlignment);
  let arena = 0;
  let trainableParameters = 0;
  for (const m of resolved.modules) {
    for (const shape of [m.aShape, m.bShape]) {
      arena += alignUp(f32Bytes(numel(shape)), align);
      trainableParameters += numel(shape);
    }
  }
  const arenaElements = Math.max(1, arena / 4);
  for (const label of ['lora.params', 'lora.grads', 'adamw.exp_avg', 'adamw.exp_avg_sq']) {
    add('trainable', label, [arenaElements]);
  }

  // Activations: the train-mode forward plan.
  const c = config;
  const L = c.numLayers;
  const rows = B * T;
  const d = c.hiddenSize;
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const gpt2 = c.family === 'gpt2';
  const ln = c.norm.kind === 'layer';
  const A = 'activations';
  add(A, 'train.ids', [rows], 'i32');
  add(A, 'train.embedding_errors', [2], 'u32');
  add(A, 'train.embedded', [rows, d]);
  add(A, 'train.layer{i}.out', [rows, d], 'f32', L);
  for (const m of resolved.modules) add(A, `train.layer${m.layer ?? '?'}.${m.name}.lora_h`, [rows, m.r]);
  // One full set per layer, or one shared set when recomputing.
  const sets = recompute ? 1 : L;
  const layer = (name: string, shape: number[], dtype: EstimatedBuffer['dtype'] = 'f32') =>
    add(A, `train.layer${recompute ? '' : '{i}'}.${name}`, shape, dtype, sets);
  layer('n1', [rows, d]);
  layer('n1.rstd', [rows]);
  if (ln) layer('n1.mean', [rows]);
  if (!gpt2) {
    layer('q', [rows, qDim]);
    layer('k', [rows, kvDim]);
    layer('v', [rows, kvDim]);
  }
  if (c.qkNorm) {
    layer('q_raw', [rows, qDim]);
    layer('k_raw', [rows, kvDim]);
    layer('q_norm.rstd', [rows * c.numHeads]);
    layer('k_norm.rstd', [rows * c.numKvHeads]);
  }
  if (gpt2) layer('qkv', [rows, 3 * d]);
  layer('attn', [rows, qDim]);
  layer('lse', [B, c.numHeads, T]);
  layer('attn_out', [rows, d]);
  layer('mid', [rows, d]);
  layer('n2', [rows, d]);
  layer('n2.rstd', [rows]);
  if (ln) layer('n2.mean', [rows]);
  layer(gpt2 ? 'fc' : 'gate', [rows, I]);
  if (!gpt2) layer('up', [rows, I]);
  layer('act', [rows, I]);
  layer('mlp_out', [rows, d]);
  add(A, 'train.hidden', [rows, d]);
  add(A, 'train.final_norm.rstd', [rows]);
  if (ln) add(A, 'train.final_norm.mean', [rows]);

  // Dispatches, for the uniform buffers: per layer, forward and backward.
  const linearCount = gpt2 ? 4 : 7;
  const loraCount = resolved.modules.length;
  const plainCount = L * linearCount - loraCount;
  const uNorm = ln ? 32 : 48;
  let fwdBytes = 48 /* embedding */ + uNorm /* final norm */;
  let fwdCount = 2;
  let bwdBytes = uNorm; // final norm backward
  let bwdCount = 1;
  // Linears: forward h + y (LoRA) or y; backward g, dB, dA, dx (LoRA) or dx.
  fwdBytes += loraCount * (U_THIN + U_MATMUL) + plainCount * U_MATMUL;
  fwdCount += 2 * loraCount + plainCount;
  bwdBytes += loraCount * (3 * U_THIN + U_MATMUL) + plainCount * U_MATMUL;
  bwdCount += 4 * loraCount + plainCount;
  // Per layer: 2 norms, attention, 2 residuals, the activation; RoPE and q/k norms (Llama family);
  // the fused-qkv copies (GPT-2).
  fwdBytes += L * (2 * uNorm + U_ATTENTION + 3 * U_ELEMENTWISE);
  fwdCount += L * 6;
  bwdBytes += L * (2 * uNorm + 3 * U_ATTENTION + U_ELEMENTWISE);
  bwdCount += L * 6;
  if (gpt2) {
    bwdBytes += L * 3 * U_THIN;
    bwdCount += L * 3;
  } else {
    const extra = 2 + (c.qkNorm ? 2 : 0);
    fwdBytes += L * extra * 48;
    fwdCount += L * extra;
    bwdBytes += L * extra * 48;
    bwdCount += L * extra;
  }
  uniforms(A, 'forward dispatch parameters', fwdCount, Math.round(fwdBytes / fwdCount));

  // Scratch: the backward plan, the loss, the trainer's inputs and optimizer buffers.
  const S = 'scratch';
  add(S, 'backward.labels', [rows], 'i32');
  add(S, 'backward.loss', [2]);
  add(S, 'backward.loss_errors', [2], 'u32');
  add(S, 'backward.lse', [rows]);
  add(S, 'backward.d_hidden', [rows, d]);
  const chunk = ctx ? crossEntropyChunk(ctx, rows, c.vocabSize) : lossChunk(rows, c.vocabSize, limits);
  const chunks = Math.ceil(c.vocabSize / chunk);
  add(S, 'loss.logits', [rows, chunk]);
  add(S, 'loss.training.forward.stats', [rows, 4]);
  add(S, 'loss.training.backward.coef', [4]);
  add(S, 'backward.d_resid', [rows, d]);
  add(S, 'backward.d_norm_out', [rows, d]);
  add(S, 'backward.d_act', [rows, I]);
  add(S, 'backward.d_gate', [rows, I]);
  if (!gpt2) add(S, 'backward.d_up', [rows, I]);
  add(S, 'backward.d_attn', [rows, qDim]);
  add(S, 'backward.dq', [rows, qDim]);
  add(S, 'backward.dk', [rows, kvDim]);
  add(S, 'backward.dv', [rows, kvDim]);
  add(S, 'backward.attention_delta', [B, c.numHeads, T]);
  if (c.qkNorm) {
    add(S, 'backward.dq_raw', [rows, qDim]);
    add(S, 'backward.dk_raw', [rows, kvDim]);
  }
  if (gpt2) {
    add(S, 'backward.dqkv', [rows, 3 * d]);
    add(S, 'backward.zero', [1], 'i32');
  }
  for (const r of new Set(resolved.modules.map((m) => m.r))) add(S, `backward.lora_g_r${r}`, [rows, r]);
  add(S, 'train.ids.{k}', [rows], 'i32', K);
  add(S, 'train.targets.{k}', [rows], 'i32', K);
  add(S, 'train.loss_log', [K, 2]);
  add(S, 'train.grad_norm', [3]);
  add(S, 'train.adamw_latch', [1], 'u32');
  // The step reports the host maps (two made up front: one being read, one queued behind it).
  add(S, 'train.report.{i}', [Math.ceil((8 * K + 24) / 16) * 4], 'u32', 2);
  const partials = ctx
    ? reducePartialsSize(ctx, arenaElements)
    : partialsSize(arenaElements, limits, options.cpuAdapter ?? false);
  add(S, 'train.grad_norm_partials', [partials]);
  // Loss: forward 2 per chunk + finish; backward scale + dlogits and dH per chunk + the LM-head
  // matmul per chunk but the one the forward left in the scratch; optimizer: norm (2) + AdamW.
  const lossCount = 2 * chunks + 1 + 1 + 3 * chunks - 1;
  bwdBytes += lossCount * U_MATMUL + 2 * U_REDUCE + U_MATMUL;
  bwdCount += lossCount + 3;
  uniforms(S, 'backward, loss and optimizer dispatch parameters', bwdCount, Math.round(bwdBytes / bwdCount));

  const sum = (cat: MemoryCategory) =>
    buffers.filter((b) => b.category === cat).reduce((n, b) => n + b.bytes * b.count, 0);
  // model.bytes counts elements, not the 16-byte rounding of each buffer.
  const frozenWeights = buffers
    .filter((b) => b.category === 'frozenWeights')
    .reduce((n, b) => n + numel(b.shape) * (b.dtype === 'f16' ? 2 : 4), 0);
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
      lossChunk: chunk,
      adaptedModules: resolved.modules.length,
      trainableParameters,
    },
  };
}

/** The total of a run went over the budget the caller gave. */
export class MemoryBudgetError extends LimitExceededError {
  constructor(
    readonly estimate: MemoryEstimate,
    budget: number,
  ) {
    super('memoryBudget', estimate.total, budget, 'training');
    this.message =
      `training needs about ${formatBytes(estimate.total)} of GPU memory (${describeEstimate(estimate)}), ` +
      `over the budget of ${formatBytes(budget)}: lower batch·seq or use recompute (activations), ` +
      'f16 weights, or fewer target modules / a lower r';
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
 * Throws before anything is allocated when the estimate cannot run on `ctx`: a LimitExceededError
 * naming the biggest buffer over maxBufferSize or maxStorageBufferBindingSize (every buffer of a
 * training run is bound as storage), or a MemoryBudgetError when the total exceeds `budget`.
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
      throw new LimitExceededError(limit, worst.bytes, allowed, what);
    }
  }
  if (options.budget !== undefined && estimate.total > options.budget)
    throw new MemoryBudgetError(estimate, options.budget);
}
