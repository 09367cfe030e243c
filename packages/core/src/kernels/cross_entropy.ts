/**
 * The causal language-model loss (Hugging Face's ForCausalLMLoss after the label shift), forward
 * and backward, straight from the final hidden states: the vocabulary is cut into chunks of C
 * rows of the LM head, and only one [rows, C] block of logits exists at a time. See
 * shaders/cross_entropy.wgsl for the math.
 *
 * Three plans, all recorded into one StepEncoder with no host round trip:
 *   planCrossEntropyForward   per chunk: logits = H·E[chunk]ᵀ (planMatmul with wRows), then an
 *                             online max/Σexp update; then one finish dispatch writing lse, the
 *                             per-row loss, the loss and the count.
 *   planCrossEntropyBackward  coef = g / divisor; per chunk (last first): logits again,
 *                             dz = softmax − onehot in place, dH (+)= dz·E[chunk].
 *   planCrossEntropyTraining  both, sharing one logits scratch; the backward starts with the
 *                             chunk the forward left in the scratch, so that chunk is not recomputed.
 * and planLogitsRows for the logits of a few selected rows (generation).
 *
 * The divisor (default: the number of counted labels, computed on the GPU) and the upstream
 * gradient g are uniforms the plans can rewrite between steps (setDivisor, setGradScale), so a
 * trainer plans once and changes them per step, as gradient accumulation needs.
 */
import source from '../../../../shaders/cross_entropy.wgsl?raw';
import type { GpuContext } from '../context.js';
import { LimitExceededError, ShapeError } from '../errors.js';
import {
  bindKernel,
  type Dispatch,
  getKernel,
  type Kernel,
  type KernelPlan,
  type KernelSpec,
  kernelPlan,
  packUniforms,
} from '../kernel.js';
import { formatShape } from '../shape.js';
import { type RowTable, tableParts } from '../table.js';
import { createTensor, type Tensor, tensorView } from '../tensor.js';
import { grid1d, planCopyRows } from './elementwise.js';
import { withGroupReduce } from './group_reduce.js';
import { checkLossScaleState } from './loss_scale.js';
import { isCpuAdapter, lossScaledTiles, type MatmulOptions, planMatmul, type TileMath } from './matmul.js';

/** The label that marks a row as not counted (PyTorch's default ignore_index). */
export const CROSS_ENTROPY_IGNORE_INDEX = -100;
/** Bits of errors[0] (errors[1] counts the rows concerned). */
export const CROSS_ENTROPY_LABEL_OUT_OF_RANGE = 1;
export const CROSS_ENTROPY_ROW_OUT_OF_RANGE = 2;
/** Vocabulary rows per chunk at least, when the memory budget allows. */
export const CROSS_ENTROPY_DEFAULT_CHUNK = 4096;
/**
 * The default chunk grows past CROSS_ENTROPY_DEFAULT_CHUNK while its [rows, C] f32 scratch stays
 * within this many bytes: every chunk costs five dispatches, so at 4×128 rows SmolLM2's 49,152-row
 * vocabulary is 3 chunks (16 dispatches, 32 MiB) rather than 12 (61 dispatches, 8 MiB).
 */
export const CROSS_ENTROPY_DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024;
/** Default budget for the logits scratch [rows, C]. */
export const CROSS_ENTROPY_DEFAULT_SCRATCH_BYTES = 64 * 1024 * 1024;

type Entry =
  | 'cross_entropy_fwd_chunk'
  | 'cross_entropy_fwd_finish'
  | 'cross_entropy_fwd_finish_scaled'
  | 'cross_entropy_bwd_scale'
  | 'cross_entropy_bwd_dlogits'
  | 'cross_entropy_gather_rows';

const BINDINGS: Record<Entry, KernelSpec['bindings']> = {
  cross_entropy_fwd_chunk: ['uniform', 'read', 'read', 'write'],
  cross_entropy_fwd_finish: ['uniform', 'read', 'read', 'write', 'write', 'write', 'write'],
  cross_entropy_fwd_finish_scaled: ['uniform', 'read', 'read', 'write', 'write', 'write', 'write', 'read'],
  cross_entropy_bwd_scale: ['uniform', 'read', 'write'],
  cross_entropy_bwd_dlogits: ['uniform', 'read', 'read', 'read', 'write'],
  cross_entropy_gather_rows: ['uniform', 'read', 'read', 'write', 'write'],
};

// group_sum and friends (group_reduce.ts) go before the kernel's own source.
const sources = withGroupReduce('shaders/cross_entropy.wgsl', source);

const spec = (ctx: GpuContext, entryPoint: Entry): KernelSpec => ({
  ...sources(ctx),
  entryPoint,
  bindings: BINDINGS[entryPoint],
});

/** Sizing of the chunked loss. */
export interface CrossEntropyChunkOptions {
  /**
   * Vocabulary rows per chunk: a multiple of 4 (so every chunk starts at an aligned row of E), or
   * anything ≥ V for one chunk. Default the larger of CROSS_ENTROPY_DEFAULT_CHUNK and what fits
   * CROSS_ENTROPY_DEFAULT_CHUNK_BYTES, lowered to fit `maxScratchBytes` and the device's buffer
   * limits.
   */
  readonly chunk?: number;
  /** Budget for the [rows, C] f32 logits scratch. Default CROSS_ENTROPY_DEFAULT_SCRATCH_BYTES. */
  readonly maxScratchBytes?: number;
}

export interface CrossEntropyOptions extends CrossEntropyChunkOptions {
  /**
   * Divides the summed loss (and scales the gradient). Default: the number of counted labels in
   * this batch, computed on the GPU. Give the total over all micro-batches when accumulating
   * gradients. Plans can change it later with setDivisor. With no counted label and no divisor the
   * loss and the gradient are 0 (PyTorch's mean reduction would give NaN there).
   */
  readonly divisor?: number;
  /**
   * A caller-owned f32 scratch of at least rows·C elements to hold the logits, instead of one the
   * plan allocates (two plans can share one). Not released by dispose().
   */
  readonly logits?: Tensor;
  readonly label?: string;
}

export interface CrossEntropyBackwardOptions extends CrossEntropyOptions {
  /** g = ∂L/∂loss, the upstream gradient. Default 1. Plans can change it with setGradScale. */
  readonly g?: number;
  /** Add into dH instead of overwriting it (default false: the first chunk overwrites dH). */
  readonly accumulate?: boolean;
  /**
   * planCrossEntropyTraining: form dz inside each chunk's dH matmul as it stages the logits
   * (matmul_dlogits) rather than in a dispatch that rewrites them first. Default
   * dzInMatmulPays(ctx); tests and benchmarks set it to run either plan on any adapter.
   */
  readonly dzInMatmul?: boolean;
  /**
   * planCrossEntropyTraining only, with a loss scale (CrossEntropyTrainingBuffers.lossScale):
   * 'f16' stages the scaled dz and E's rows in f16 in the dH matmuls, where E is stored below f32
   * (f16TileMathApplies). Default 'f32'. The logits' matmuls stay f32; planCrossEntropyBackward
   * (no loss scale) ignores it.
   */
  readonly dhTileMath?: TileMath;
}

/**
 * Whether planCrossEntropyTraining forms dz inside the dH matmuls by default on this device: on
 * GPUs. On the CPU adapters each workgroup along a row of tiles repeating the exponentials measured
 * slower than the dispatch it saves (`pnpm bench --suite kernels --only loss_dz_in_dh`: lavapipe
 * 0.91, SwiftShader 0.98).
 */
export function dzInMatmulPays(ctx: GpuContext): boolean {
  return !isCpuAdapter(ctx);
}

/** The forward's operands. rows = B·T. */
export interface CrossEntropyForwardBuffers {
  /** H [rows, d] (any leading shape) f32: the final norm's output. */
  readonly h: Tensor;
  /** E [V, d], f32 or packed f16: the LM head weight (tied to the embedding or not), frozen; split
   * by rows (core's table.ts) when it is larger than a binding, chunks then never straddle parts. */
  readonly e: RowTable;
  /** [rows] i32: the target of each row, already shifted (input_ids[b, t+1]); -100 = ignored. */
  readonly labels: Tensor;
  /** [rows] f32, written: log Σ_v exp z[i, v]; saved for the backward. */
  readonly lse: Tensor;
  /** ≥ 2 f32, written: loss[0] = Σ row losses / divisor, loss[1] = the number of counted rows
   * (≥ 3 for planCrossEntropyTraining, whose forward leaves the backward's g / divisor in loss[2]). */
  readonly loss: Tensor;
  /**
   * ≥ 2 u32, accumulated: errors[0] |= CROSS_ENTROPY_LABEL_OUT_OF_RANGE and errors[1] += 1 for
   * each label outside [0, V) other than -100 (such a row is treated as ignored). Clear it before
   * the first step (StepEncoder.clear) and read it when convenient.
   */
  readonly errors: Tensor;
  /** [rows] f32, written when given: lse − z[label] per row, 0 where ignored. */
  readonly rowLoss?: Tensor;
}

/** The backward's operands. */
export interface CrossEntropyBackwardBuffers {
  readonly h: Tensor;
  readonly e: RowTable;
  readonly labels: Tensor;
  /** [rows] f32 from the forward. */
  readonly lse: Tensor;
  /** [rows, d] f32 like h: written (or accumulated with `accumulate`). Must not overlap h. */
  readonly dh: Tensor;
}

export type CrossEntropyTrainingBuffers = CrossEntropyForwardBuffers & {
  readonly dh: Tensor;
  /**
   * A dynamic loss scale's state (planLossScaleUpdate; S in element 0, a power of two), read: the
   * gradient dH and everything the backward forms from it carry S (loss[2] = S·g / divisor). The
   * loss itself is not scaled.
   */
  readonly lossScale?: Tensor;
};

export interface CrossEntropyPlan extends KernelPlan {
  /** Vocabulary rows per chunk. */
  readonly chunk: number;
  readonly chunks: number;
  /** Sets the divisor for the next steps; undefined = the count of labels on the GPU. */
  setDivisor(divisor: number | undefined): void;
}

export interface CrossEntropyGradPlan extends CrossEntropyPlan {
  /** Sets g = ∂L/∂loss for the next steps. */
  setGradScale(g: number): void;
}

interface Dims {
  rows: number;
  d: number;
  vocab: number;
}

function checkOperands(op: string, h: Tensor, e: RowTable, labels: Tensor): Dims {
  if (e.shape.length !== 2) throw new ShapeError(`${op}: E ${e.label} must be 2-D [V, d], got ${formatShape(e.shape)}`);
  if (e.dtype !== 'f32' && e.dtype !== 'f16') {
    throw new ShapeError(`${op}: E ${e.label} must be f32 or f16, got ${e.dtype}`);
  }
  const [vocab, d] = e.shape as [number, number];
  if (h.dtype !== 'f32' || h.shape[h.shape.length - 1] !== d) {
    throw new ShapeError(
      `${op}: H ${h.label} ${h.dtype}${formatShape(h.shape)} must be f32 rows of d = ${d} (E ${e.label} ${formatShape(e.shape)})`,
    );
  }
  const rows = h.size / d;
  if (labels.dtype !== 'i32' || labels.size !== rows) {
    throw new ShapeError(
      `${op}: labels ${labels.label} ${labels.dtype}${formatShape(labels.shape)} must be ${rows} i32 values, one per row of H ${formatShape(h.shape)}`,
    );
  }
  return { rows, d, vocab };
}

function expectF32(op: string, name: string, t: Tensor, size: number, what: string, atLeast = false): void {
  if (t.dtype !== 'f32' || (atLeast ? t.size < size : t.size !== size)) {
    throw new ShapeError(
      `${op}: ${name} ${t.label} ${t.dtype}${formatShape(t.shape)} must be ${atLeast ? '≥ ' : ''}${size} f32 values (${what})`,
    );
  }
}

function expectErrors(op: string, t: Tensor): void {
  if (t.dtype !== 'u32' || t.size < 2) {
    throw new ShapeError(`${op}: errors ${t.label} ${t.dtype}${formatShape(t.shape)} must be ≥ 2 u32`);
  }
}

function overlaps(a: Tensor, b: Tensor): boolean {
  return (
    a.buffer === b.buffer && a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength
  );
}

function checkDivisor(op: string, divisor: number | undefined): void {
  if (divisor !== undefined && !(Number.isFinite(divisor) && divisor > 0)) {
    throw new ShapeError(`${op}: divisor ${divisor} must be a positive finite number`);
  }
}

/**
 * Vocabulary rows per chunk for `rows` rows and a vocabulary of `vocab`: the requested chunk (or
 * the default), lowered to a multiple of 4 whose [rows, C] f32 scratch fits the budget and the
 * device's binding limits; V itself when that fits.
 */
export function crossEntropyChunk(
  ctx: GpuContext,
  rows: number,
  vocab: number,
  opts: CrossEntropyChunkOptions = {},
): number {
  return crossEntropyChunkFor(ctx.limits, rows, vocab, opts);
}

/** crossEntropyChunk for a device known only by its limits (a memory estimate without a GPU). */
export function crossEntropyChunkFor(
  limits: Pick<GPUSupportedLimits, 'maxStorageBufferBindingSize' | 'maxBufferSize'>,
  rows: number,
  vocab: number,
  opts: CrossEntropyChunkOptions = {},
): number {
  const op = 'cross_entropy';
  if (opts.chunk !== undefined) {
    if (!Number.isSafeInteger(opts.chunk) || opts.chunk < 1 || (opts.chunk < vocab && opts.chunk % 4 !== 0)) {
      throw new ShapeError(`${op}: chunk ${opts.chunk} must be a positive multiple of 4 (or ≥ V = ${vocab})`);
    }
  }
  const budget = Math.min(
    opts.maxScratchBytes ?? CROSS_ENTROPY_DEFAULT_SCRATCH_BYTES,
    limits.maxStorageBufferBindingSize,
    limits.maxBufferSize,
  );
  const fits = Math.floor(budget / (4 * rows));
  const byBytes = Math.floor(CROSS_ENTROPY_DEFAULT_CHUNK_BYTES / (4 * rows));
  const want = Math.min(opts.chunk ?? Math.max(CROSS_ENTROPY_DEFAULT_CHUNK, byBytes), vocab);
  if (want === vocab && vocab <= fits) return vocab;
  const chunk = Math.floor(Math.min(want, fits) / 4) * 4;
  if (chunk < 4) {
    throw new LimitExceededError('maxScratchBytes', 16 * rows, budget, `${op} logits scratch [${rows}, 4]`);
  }
  return chunk;
}

/** Scratch bytes the plans allocate for these sizes (for the memory estimate). */
export function crossEntropyScratchBytes(
  ctx: { readonly limits: Pick<GPUSupportedLimits, 'maxStorageBufferBindingSize' | 'maxBufferSize'> },
  rows: number,
  vocab: number,
  opts: CrossEntropyChunkOptions = {},
): {
  chunk: number;
  logits: number;
  stats: number;
  count: number;
  forward: number;
  backward: number;
  training: number;
} {
  const chunk = crossEntropyChunkFor(ctx.limits, rows, vocab, opts);
  const logits = align16(rows * chunk * 4);
  const stats = align16(rows * 16);
  // The backward's count of labelled rows; training reads the forward's loss output instead.
  const count = 16;
  return {
    chunk,
    logits,
    stats,
    count,
    forward: logits + stats,
    backward: logits + count,
    training: logits + stats,
  };
}

function align16(n: number): number {
  return Math.max(16, Math.ceil(n / 16) * 16);
}

/** Invocations per workgroup: 64 on CPU adapters (every barrier switches each invocation), else
 * 256, within the device's limits; a power of two. */
function workgroupSize(ctx: GpuContext): number {
  const cap = Math.min(
    isCpuAdapter(ctx) ? 64 : 256,
    ctx.limits.maxComputeInvocationsPerWorkgroup,
    ctx.limits.maxComputeWorkgroupSizeX,
  );
  let wg = 1;
  while (wg * 2 <= cap) wg *= 2;
  return wg;
}

interface Params {
  rows: number;
  vocab: number;
  start?: number;
  count?: number;
  first?: boolean;
  divisor?: number;
  g?: number;
  rowLoss?: boolean;
  gridX?: number;
  d?: number;
  n?: number;
  /** fwd_finish: also write g / divisor to loss[2] (training); bwd_dlogits: read it there. */
  hasCoef?: boolean;
}

function uniforms(q: Params): ArrayBuffer {
  return packUniforms([
    ['u32', q.rows],
    ['u32', q.vocab],
    ['u32', q.start ?? 0],
    ['u32', q.count ?? 0],
    ['u32', q.first ? 1 : 0],
    ['u32', q.divisor !== undefined ? 1 : 0],
    ['f32', q.divisor ?? 0],
    ['f32', q.g ?? 1],
    ['u32', q.rowLoss ? 1 : 0],
    ['u32', q.gridX ?? 0],
    ['u32', q.d ?? 0],
    ['u32', q.n ?? 0],
    ['u32', q.hasCoef ? 1 : 0],
  ]);
}

interface Chunk {
  /** The chunk's first vocabulary row. */
  start: number;
  count: number;
  /** The logits scratch seen as [rows, count]. */
  logits: Tensor;
  /** The part of E that holds the chunk, and the chunk's first row in it. */
  e: Tensor;
  local: number;
}

/** Checks a caller's logits scratch: f32 with room for [rows, chunk]. */
function checkScratch(op: string, dims: Dims, chunk: number, given: Tensor | undefined): void {
  if (given) expectF32(op, 'logits scratch', given, dims.rows * chunk, `rows × chunk = ${dims.rows} × ${chunk}`, true);
}

/** The chunk list over the logits scratch (`given`, or one allocated and pushed to `owned`); a
 * split E is chunked part by part. */
function chunking(
  ctx: GpuContext,
  op: string,
  dims: Dims,
  chunk: number,
  e: RowTable,
  given: Tensor | undefined,
  owned: Tensor[],
): Chunk[] {
  let scratch = given;
  if (!scratch) {
    scratch = createTensor(ctx, [dims.rows, chunk], 'f32', `${op}.logits`);
    owned.push(scratch);
  }
  const chunks: Chunk[] = [];
  const views = new Map<number, Tensor>();
  for (const part of tableParts(e)) {
    for (let local = 0; local < part.rows; local += chunk) {
      const count = Math.min(chunk, part.rows - local);
      let view = views.get(count);
      if (!view) {
        view = tensorView(scratch, 0, [dims.rows, count], 'f32', `${op}.logits[${dims.rows}, ${count}]`);
        views.set(count, view);
      }
      chunks.push({ start: part.start + local, count, logits: view, e: part.tensor, local });
    }
  }
  return chunks;
}

function checkGradScale(op: string, g: number): void {
  if (!Number.isFinite(g)) throw new ShapeError(`${op}: g ${g} must be finite`);
}

function checkStorageBuffers(ctx: GpuContext, op: string, needed: number): void {
  const have = ctx.limits.maxStorageBuffersPerShaderStage;
  if (have < needed) throw new LimitExceededError('maxStorageBuffersPerShaderStage', needed, have, op);
}

function release(dispatches: readonly Dispatch[], scratch: readonly Tensor[]): void {
  for (const d of dispatches) d.dispose();
  for (const t of scratch) t.dispose();
}

/**
 * Loss forward: per chunk, logits = H·E[chunk]ᵀ and an online max/Σexp update per row; then lse,
 * the per-row loss (when `rowLoss` is given), loss[0] and loss[1] = count. 2·chunks + 1
 * dispatches. Allocates the logits scratch (unless given) and a [rows] vec4 running-state scratch.
 */
export async function planCrossEntropyForward(
  ctx: GpuContext,
  io: CrossEntropyForwardBuffers,
  opts: CrossEntropyOptions = {},
): Promise<CrossEntropyPlan> {
  return forward(ctx, io, opts);
}

/**
 * The forward; in training (`coef`) its finish also writes the backward's coefficient g / divisor
 * to loss[2] (loss then holds at least 3 values), and setGradScale sets g.
 */
async function forward(
  ctx: GpuContext,
  io: CrossEntropyForwardBuffers,
  opts: CrossEntropyOptions,
  coef?: { readonly g: number; readonly lossScale?: Tensor },
): Promise<CrossEntropyGradPlan> {
  const op = `${opts.label ?? 'cross_entropy'}.forward`;
  const lossScale = coef?.lossScale;
  if (lossScale) checkLossScaleState(op, lossScale);
  const dims = checkOperands(op, io.h, io.e, io.labels);
  expectF32(op, 'lse', io.lse, dims.rows, 'one per row');
  if (coef) expectF32(op, 'loss', io.loss, 3, "loss, count and the backward's coefficient", true);
  else expectF32(op, 'loss', io.loss, 2, 'loss and count', true);
  expectErrors(op, io.errors);
  if (io.rowLoss) expectF32(op, 'rowLoss', io.rowLoss, dims.rows, 'one per row');
  checkDivisor(op, opts.divisor);
  checkStorageBuffers(ctx, op, lossScale ? 7 : 6);
  const chunk = crossEntropyChunk(ctx, dims.rows, dims.vocab, opts);
  checkScratch(op, dims, chunk, opts.logits);
  const wg = workgroupSize(ctx);
  const [chunkK, finishK] = await Promise.all([
    getKernel(ctx, spec(ctx, 'cross_entropy_fwd_chunk'), { WG: wg }),
    getKernel(ctx, spec(ctx, lossScale ? 'cross_entropy_fwd_finish_scaled' : 'cross_entropy_fwd_finish'), { WG: wg }),
  ]);
  const owned: Tensor[] = [];
  const dispatches: Dispatch[] = [];
  try {
    const chunks = chunking(ctx, op, dims, chunk, io.e, opts.logits, owned);
    const stats = createTensor(ctx, [dims.rows, 4], 'f32', `${op}.stats`);
    owned.push(stats);
    const grid = grid1d(ctx, dims.rows, 1);
    for (const [i, c] of chunks.entries()) {
      const range = `[${c.start}:${c.start + c.count}]`;
      dispatches.push(
        await planMatmul(ctx, io.h, c.e, c.logits, {
          wRows: { start: c.local, count: c.count },
          label: `${op}.logits${range}`,
        }),
      );
      dispatches.push(
        bindKernel(ctx, chunkK, {
          label: `${op}.chunk${range}`,
          resources: [io.labels, c.logits, stats],
          workgroups: grid.workgroups,
          uniforms: uniforms({ ...dims, start: c.start, count: c.count, first: i === 0, gridX: grid.rowStride }),
        }),
      );
    }
    let divisor = opts.divisor;
    let g = coef?.g ?? 1;
    const finishParams = () =>
      uniforms({ ...dims, divisor, g, rowLoss: io.rowLoss !== undefined, hasCoef: coef !== undefined });
    const finish = bindKernel(ctx, finishK, {
      label: `${op}.finish`,
      resources: [
        io.labels,
        stats,
        io.lse,
        io.rowLoss ?? ctx.placeholder(),
        io.loss,
        io.errors,
        ...(lossScale ? [lossScale] : []),
      ],
      workgroups: [1],
      uniforms: finishParams(),
    });
    dispatches.push(finish);
    return {
      ...kernelPlan(dispatches, owned),
      chunk,
      chunks: chunks.length,
      setDivisor(next) {
        checkDivisor(op, next);
        divisor = next;
        finish.setUniforms(finishParams());
      },
      setGradScale(next) {
        checkGradScale(op, next);
        g = next;
        finish.setUniforms(finishParams());
      },
    };
  } catch (error) {
    release(dispatches, owned);
    throw error;
  }
}

/**
 * Loss backward: coef = g / divisor, then per chunk (the last chunk first) logits again,
 * dz = (softmax − onehot)·coef in place, dH (+)= dz·E[chunk]. The first chunk processed overwrites
 * dH unless `accumulate`; ignored rows get zero gradient. 1 + 3·chunks dispatches.
 */
export async function planCrossEntropyBackward(
  ctx: GpuContext,
  io: CrossEntropyBackwardBuffers,
  opts: CrossEntropyBackwardOptions = {},
): Promise<CrossEntropyGradPlan> {
  return backward(ctx, io, opts);
}

async function backward(
  ctx: GpuContext,
  io: CrossEntropyBackwardBuffers,
  opts: CrossEntropyBackwardOptions,
  /**
   * Training: the forward just ran, so the logits scratch holds its last chunk, and `loss` (its
   * output) holds the count in loss[1] and dz's coefficient g / divisor (times the loss scale
   * where there is one) in loss[2], which every dz here takes: no scale
   * dispatch, and with dzInMatmul each chunk's dH matmul forms dz as it stages the logits
   * (matmul_dlogits, whose coefficient the forward sets) instead of a dlogits dispatch.
   */
  training?: { readonly loss: Tensor; readonly dzInMatmul: boolean },
): Promise<CrossEntropyGradPlan> {
  const op = `${opts.label ?? 'cross_entropy'}.backward`;
  const dims = checkOperands(op, io.h, io.e, io.labels);
  expectF32(op, 'lse', io.lse, dims.rows, 'one per row');
  if (io.dh.dtype !== 'f32' || io.dh.size !== io.h.size || io.dh.shape[io.dh.shape.length - 1] !== dims.d) {
    throw new ShapeError(
      `${op}: dH ${io.dh.label} ${io.dh.dtype}${formatShape(io.dh.shape)} must be f32 shaped like H ${formatShape(io.h.shape)}`,
    );
  }
  if (overlaps(io.dh, io.h)) throw new ShapeError(`${op}: dH ${io.dh.label} overlaps H ${io.h.label}`);
  checkDivisor(op, opts.divisor);
  checkGradScale(op, opts.g ?? 1);
  const chunk = crossEntropyChunk(ctx, dims.rows, dims.vocab, opts);
  checkScratch(op, dims, chunk, opts.logits);
  const wg = workgroupSize(ctx);
  const viaMatmul = training?.dzInMatmul ?? false;
  const [scaleK, dlogitsK] = await Promise.all([
    training ? undefined : getKernel(ctx, spec(ctx, 'cross_entropy_bwd_scale'), { WG: wg }),
    viaMatmul ? undefined : getKernel(ctx, spec(ctx, 'cross_entropy_bwd_dlogits'), { WG: wg }),
  ]);
  const owned: Tensor[] = [];
  const dispatches: Dispatch[] = [];
  try {
    const chunks = chunking(ctx, op, dims, chunk, io.e, opts.logits, owned);
    let divisor = opts.divisor;
    let g = opts.g ?? 1;
    // The count of labelled rows, in element 1: the forward's loss output in training, else what
    // the scale dispatch counts.
    let count: Tensor;
    const retune: { dispatch: Dispatch; params: () => ArrayBuffer }[] = [];
    if (training) count = training.loss;
    else {
      count = createTensor(ctx, [4], 'f32', `${op}.count`);
      owned.push(count);
      const params = () => uniforms({ ...dims, divisor, g });
      const scale = bindKernel(ctx, scaleK as Kernel, {
        label: `${op}.scale`,
        resources: [io.labels, count],
        workgroups: [1],
        uniforms: params(),
      });
      dispatches.push(scale);
      retune.push({ dispatch: scale, params });
    }
    // Last chunk first: after a forward the scratch still holds it.
    for (const [i, c] of [...chunks].reverse().entries()) {
      const range = `[${c.start}:${c.start + c.count}]`;
      if (!(i === 0 && training)) {
        dispatches.push(
          await planMatmul(ctx, io.h, c.e, c.logits, {
            wRows: { start: c.local, count: c.count },
            label: `${op}.logits${range}`,
          }),
        );
      }
      const dh: MatmulOptions = {
        transW: false,
        wRows: { start: c.local, count: c.count },
        beta: i === 0 && !opts.accumulate ? 0 : 1,
        label: `${op}.dh${range}`,
      };
      // The scaled dz in f16 where asked for and E's rows allow (planCrossEntropyTraining checked
      // that a scale is there).
      const tiles = (o: MatmulOptions): MatmulOptions => (training ? lossScaledTiles(ctx, c.e, o, opts.dhTileMath) : o);
      if (training && viaMatmul) {
        const dz = { labels: io.labels, lse: io.lse, coef: training.loss, start: c.start, vocab: dims.vocab };
        dispatches.push(await planMatmul(ctx, c.logits, c.e, io.dh, tiles({ ...dh, dlogits: dz })));
        continue;
      }
      const grid = grid1d(ctx, dims.rows * c.count, wg);
      // In training dz's coefficient is the forward's (coef[2], loss-scaled where the step is).
      const params = () =>
        uniforms({
          ...dims,
          start: c.start,
          count: c.count,
          gridX: grid.rowStride,
          divisor,
          g,
          hasCoef: training !== undefined,
        });
      const dlogits = bindKernel(ctx, dlogitsK as Kernel, {
        label: `${op}.dlogits${range}`,
        resources: [io.labels, io.lse, count, c.logits],
        workgroups: grid.workgroups,
        uniforms: params(),
      });
      dispatches.push(dlogits, await planMatmul(ctx, c.logits, c.e, io.dh, tiles(dh)));
      retune.push({ dispatch: dlogits, params });
    }
    return {
      ...kernelPlan(dispatches, owned),
      chunk,
      chunks: chunks.length,
      setDivisor(next) {
        checkDivisor(op, next);
        divisor = next;
        for (const r of retune) r.dispatch.setUniforms(r.params());
      },
      setGradScale(next) {
        checkGradScale(op, next);
        g = next;
        for (const r of retune) r.dispatch.setUniforms(r.params());
      },
    };
  } catch (error) {
    release(dispatches, owned);
    throw error;
  }
}

/** Dispatches of planCrossEntropyTraining over `chunks` vocabulary chunks: per chunk the forward's
 * matmul and online update, the finish, per chunk dH (dz formed as it stages the logits; or a
 * dlogits dispatch before it), and the LM-head matmul of every chunk but the one the forward left
 * in the scratch. */
export function crossEntropyTrainingDispatchCount(chunks: number, dzInMatmul = true): number {
  return 2 * chunks + 1 + (dzInMatmul ? 1 : 2) * chunks + (chunks - 1);
}

/**
 * Forward then backward in one sequence for training, with one logits scratch shared by every
 * chunk of both: the forward's outputs (lse, loss, count, errors, rowLoss) as in
 * planCrossEntropyForward, and dH written (or accumulated) as in planCrossEntropyBackward. The
 * backward starts from the chunk the forward left in the scratch, so it runs one LM-head matmul
 * fewer: 3·chunks − 1 matmuls (2 for a vocabulary that fits one chunk). `loss` holds at least 3
 * values here: the forward's finish leaves dz's coefficient g / divisor in loss[2] (times S with a
 * loss scale), and with
 * `dzInMatmul` (GPUs) each dH matmul forms dz from the logits as it stages them (matmul_dlogits),
 * so no dispatch rewrites the logits: 4·chunks dispatches in all (5·chunks without).
 */
export async function planCrossEntropyTraining(
  ctx: GpuContext,
  io: CrossEntropyTrainingBuffers,
  opts: CrossEntropyBackwardOptions = {},
): Promise<CrossEntropyGradPlan> {
  const label = opts.label ?? 'cross_entropy';
  const dims = checkOperands(`${label}.training`, io.h, io.e, io.labels);
  const chunk = crossEntropyChunk(ctx, dims.rows, dims.vocab, opts);
  const owned: Tensor[] = [];
  const logits = opts.logits ?? createTensor(ctx, [dims.rows, chunk], 'f32', `${label}.logits`);
  if (!opts.logits) owned.push(logits);
  let fwd: CrossEntropyGradPlan | undefined;
  try {
    checkGradScale(`${label}.training`, opts.g ?? 1);
    fwd = await forward(ctx, io, { ...opts, chunk, logits }, { g: opts.g ?? 1, lossScale: io.lossScale });
    const dzInMatmul = opts.dzInMatmul ?? dzInMatmulPays(ctx);
    if ((opts.dhTileMath ?? 'f32') === 'f16' && !io.lossScale)
      throw new ShapeError(`${label}.training: f16 tiles for dH need a loss scale (lossScale)`);
    const bwd = await backward(ctx, io, { ...opts, chunk, logits }, { loss: io.loss, dzInMatmul });
    const f = fwd;
    return {
      ...kernelPlan([...fwd.dispatches, ...bwd.dispatches], [...owned, ...fwd.scratch, ...bwd.scratch]),
      chunk,
      chunks: fwd.chunks,
      // The forward's finish writes the coefficient the backward's dz reads (in its dH matmuls, or
      // in the dlogits dispatches without dzInMatmul); the uniforms of both carry g and the divisor.
      setDivisor(divisor) {
        f.setDivisor(divisor);
        bwd.setDivisor(divisor);
      },
      setGradScale(g) {
        f.setGradScale(g);
        bwd.setGradScale(g);
      },
    };
  } catch (error) {
    fwd?.dispose();
    release([], owned);
    throw error;
  }
}

export interface LogitsRowsBuffers {
  /** H [rows, d] f32. */
  readonly h: Tensor;
  /** E [V, d], f32 or packed f16, possibly split by rows. */
  readonly e: RowTable;
  /** [n] i32: the rows of H to take (say the last position of each sequence). Default: all rows. */
  readonly index?: Tensor;
  /** [n, V] f32, written. */
  readonly logits: Tensor;
  /**
   * ≥ 2 u32, accumulated; required with `index`: errors[0] |= CROSS_ENTROPY_ROW_OUT_OF_RANGE and
   * errors[1] += 1 per index outside [0, rows), whose logits row comes out as zeros.
   */
  readonly errors?: Tensor;
}

/**
 * logits[j] = H[index[j]]·Eᵀ for a few rows (generation's sampling): a gather into an [n, d]
 * scratch, then one matmul. Without `index`, the logits of every row of H.
 */
export async function planLogitsRows(
  ctx: GpuContext,
  io: LogitsRowsBuffers,
  opts: { label?: string } = {},
): Promise<KernelPlan> {
  const op = opts.label ?? 'logits_rows';
  const { h, e, index, logits } = io;
  if (e.shape.length !== 2) throw new ShapeError(`${op}: E ${e.label} must be 2-D [V, d], got ${formatShape(e.shape)}`);
  const [vocab, d] = e.shape as [number, number];
  if (h.dtype !== 'f32' || h.shape[h.shape.length - 1] !== d) {
    throw new ShapeError(`${op}: H ${h.label} ${h.dtype}${formatShape(h.shape)} must be f32 rows of d = ${d}`);
  }
  const rows = h.size / d;
  let n = rows;
  if (index) {
    if (index.dtype !== 'i32') throw new ShapeError(`${op}: index ${index.label} must be i32, got ${index.dtype}`);
    n = index.size;
    if (!io.errors) throw new ShapeError(`${op}: an errors buffer is required with an index`);
    expectErrors(op, io.errors);
  }
  if (logits.dtype !== 'f32' || logits.size !== n * vocab || logits.shape[logits.shape.length - 1] !== vocab) {
    throw new ShapeError(
      `${op}: logits ${logits.label} ${logits.dtype}${formatShape(logits.shape)} must be f32 [${n}, ${vocab}]`,
    );
  }
  const dispatches: Dispatch[] = [];
  const scratch: Tensor[] = [];
  try {
    let x = h;
    if (index && io.errors) {
      const wg = workgroupSize(ctx);
      const gatherK = await getKernel(ctx, spec(ctx, 'cross_entropy_gather_rows'), { WG: wg });
      x = createTensor(ctx, [n, d], 'f32', `${op}.rows`);
      scratch.push(x);
      const grid = grid1d(ctx, n * d, wg);
      dispatches.push(
        bindKernel(ctx, gatherK, {
          label: `${op}.gather`,
          resources: [index, h, x, io.errors],
          workgroups: grid.workgroups,
          uniforms: uniforms({ rows, vocab, d, n, gridX: grid.rowStride }),
        }),
      );
    }
    dispatches.push(...(await planTableProduct(ctx, x, e, logits, `${op}.matmul`, scratch)));
    return kernelPlan(dispatches, scratch);
  } catch (error) {
    release(dispatches, scratch);
    throw error;
  }
}

/**
 * C [n, V] = X·Eᵀ for a table E that may be split by rows: one matmul for a whole table; per part,
 * a matmul into an [n, rowsᵢ] scratch and a copy into C's columns [startᵢ, startᵢ + rowsᵢ)
 * otherwise. Scratch tensors are pushed to `scratch` (the caller owns them).
 */
export async function planTableProduct(
  ctx: GpuContext,
  x: Tensor,
  e: RowTable,
  c: Tensor,
  label: string,
  scratch: Tensor[],
): Promise<Dispatch[]> {
  const parts = tableParts(e);
  if (parts.length === 1) return [await planMatmul(ctx, x, (parts[0] as { tensor: Tensor }).tensor, c, { label })];
  const vocab = e.shape[0] as number;
  const n = c.size / vocab;
  const zero = createTensor(ctx, [1], 'i32', `${label}.zero`);
  scratch.push(zero);
  const out: Dispatch[] = [];
  try {
    for (const part of parts) {
      const range = `[${part.start}:${part.start + part.rows}]`;
      const block = createTensor(ctx, [n, part.rows], 'f32', `${label}${range}.block`);
      scratch.push(block);
      out.push(await planMatmul(ctx, x, part.tensor, block, { label: `${label}${range}` }));
      out.push(
        await planCopyRows(
          ctx,
          block,
          zero,
          c,
          { rows: n, cols: part.rows, dstStride: vocab, dstOffset: part.start },
          0,
          `${label}${range}.copy`,
        ),
      );
    }
    return out;
  } catch (error) {
    for (const d of out) d.dispose();
    throw error;
  }
}
