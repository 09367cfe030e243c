/**
 * LoRA training on the GPU: the adapter's A and B matrices, their gradients and AdamW's moments
 * live in four arenas of identical layout; one optimizer step is recorded into one command
 * encoder and submitted once:
 *
 *   for each micro-batch k: copy its ids and targets in -> forward -> loss + backward
 *     (gradients accumulate into the gradient arena) -> copy its loss out
 *   global gradient norm -> AdamW with clipping (skipped on the GPU if a loss or the norm is not
 *   finite, and latched: see submitStep) -> with f16 tile math, the loss scale's update -> clear
 *   the gradient arena -> copy the step's report (losses, norm, latch, label errors, loss scale)
 *   into a mappable buffer
 *
 * The host reads that report asynchronously, one readback per step, while later steps are already
 * queued: nothing in a step waits for the host (submitStep).
 *
 * The loss divisor is the number of counted tokens over all micro-batches of the step
 * (transformers' num_items_in_batch), so accumulation gives the same gradient as one big batch.
 *
 * With f16 tile math the backward's products stage gradients in f16 too, under dynamic loss
 * scaling kept on the GPU (core's loss_scale.ts, torch.amp.GradScaler's rule): the loss's gradient
 * is multiplied by S, AdamW divides it out, a step whose gradients overflow is skipped and halves
 * S, and TrainerOptions.lossScale.growthInterval good steps in a row double it. No step waits for
 * the host to learn the outcome: the report carries it.
 */
import {
  adamwStepUniforms,
  createTensor,
  type Dispatch,
  dropoutCounter,
  type GpuContext,
  isCpuAdapter,
  type LossScaleConfig,
  type LrSchedule,
  learningRate,
  lossScaleInitialState,
  planAdamW,
  planL2Norm,
  planLossScaleUpdate,
  readFloat32,
  resolveLossScale,
  ShapeError,
  StepEncoder,
  type Tensor,
  TensorArena,
  type TileMath,
  WebtuneError,
  writeTensor,
} from '@webtune/core';
import {
  type BackwardPlan,
  type CausalLM,
  type EvaluateResult,
  evaluateLoss,
  type ForwardPlan,
  type LoraTrainable,
  type LoraWeightsByModule,
  namedModules,
  planBackward,
  planForward,
  shiftLabels,
  type TokenizedExample,
} from '@webtune/models';
import { defaultTrainingTileMath, reportBytes, reportOffsets, trainerBuffers } from './layout.js';
import {
  type AdapterConfigOptions,
  exportPeftAdapter,
  initLoraWeights,
  LoraConfigError,
  type LoraConfigInput,
  type LoraWeights,
  type ResolvedLora,
  resolveLoraTargets,
  validateLoraConfig,
} from './lora/index.js';
import { checkFits, checkTrainingShape, estimateMemory, type MemoryEstimate } from './memory.js';

/** Training stopped because the loss or a gradient was NaN or infinite. The adapter on the GPU
 * is the last good one (the optimizer skipped the bad update). */
export class TrainingDivergedError extends WebtuneError {
  constructor(
    readonly step: number,
    readonly loss: number,
    readonly gradNorm: number,
  ) {
    super(
      `training diverged at step ${step}: loss ${loss}, gradient norm ${gradNorm}; the adapter is kept as it was after step ${step - 1} (lower the learning rate or check the data)`,
    );
  }
}

/**
 * A step submitted behind one that diverged while both were in flight: the GPU skipped its update
 * (the adapter stayed as it was before the divergence), and it does not count as a step.
 */
export class StepDiscardedError extends WebtuneError {
  constructor(
    readonly step: number,
    readonly divergedStep: number,
  ) {
    super(
      `step ${step} was discarded: step ${divergedStep}, queued before it, diverged; the adapter is kept as it was after step ${divergedStep - 1}`,
    );
  }
}

/** A step submitted with LoraTrainer.submitStep. */
export interface StepHandle {
  /** The step number it will have if it succeeds (1-based). */
  readonly step: number;
  /**
   * Resolves with the step's result once its report has been read back, or rejects with
   * TrainingDivergedError (this step's loss or gradient was not finite) or StepDiscardedError (an
   * earlier step still in flight diverged). Unobserved rejections are not reported as unhandled.
   */
  readonly result: Promise<StepResult>;
}

export interface OptimizerOptions {
  readonly lr: number;
  readonly beta1?: number;
  readonly beta2?: number;
  readonly eps?: number;
  /** Default 0.01, torch's AdamW default. */
  readonly weightDecay?: number;
  /** Global gradient-norm clipping; default 1.0 (transformers' Trainer default), Infinity = none. */
  readonly maxGradNorm?: number;
}

export interface TrainerOptions {
  /** A PEFT LoraConfig (checked by validateLoraConfig), or an adapter already resolved on this
   * model (an imported one). */
  readonly lora: LoraConfigInput | ResolvedLora;
  readonly batch: number;
  readonly seq: number;
  /** Micro-batches per optimizer step. Default 1. */
  readonly gradAccum?: number;
  readonly optimizer: OptimizerOptions;
  /** Default: constant. lr is taken from `optimizer`. */
  readonly schedule?: Omit<LrSchedule, 'lr'>;
  /** Seeds the adapter's initialisation. Default 0. */
  readonly seed?: number;
  /** Start from these weights (an imported adapter) instead of the initialisation. */
  readonly initialWeights?: ReadonlyMap<string, LoraWeights>;
  /** Recompute each layer's activations in the backward instead of keeping them (less memory,
   * about one more forward pass of time). */
  readonly recompute?: boolean;
  /** Refuse to start when the estimated total exceeds this many bytes (WebGPU cannot report free
   * memory, so a budget can only come from the user). */
  readonly memoryBudget?: number;
  /**
   * Fused kernels where two steps of the plan can share a dispatch. Default true; false plans the
   * plain path, which tests run beside the fused one over many steps.
   */
  readonly fuse?: boolean;
  /**
   * The products' tile math (needs shader-f16 for 'f16'). 'f16': the forward's products stage
   * activations and weights stored below f32 in f16 and multiply with f32 accumulation
   * (ForwardOptions.tileMath), the attention stages q, k and v in f16, and the backward's products
   * (dx and the loss's dH) and the tiled attention's backward stage the gradients in f16 under
   * dynamic loss scaling (`lossScale`); LoRA's own gradient kernels and the loss's logits compute
   * in f32.
   * Default defaultTrainingTileMath: f16 on GPUs with shader-f16, f32 on CPU adapters and without
   * it, and for a model loaded with f32 weights.
   */
  readonly tileMath?: TileMath;
  /** Dynamic loss scaling of the f16 backward (tileMath 'f16' only): GradScaler's parameters and
   * defaults (core's LossScaleConfig). */
  readonly lossScale?: LossScaleConfig;
}

/** TrainerOptions.tileMath, or its default for this model on this device. */
function resolvedTileMath(ctx: GpuContext, model: CausalLM, options: TrainerOptions): TileMath {
  return options.tileMath ?? defaultTrainingTileMath(ctx, model.precision);
}

export interface MicroBatch {
  /** [B·T] token ids, B = the trainer's batch, T = its seq. */
  readonly inputIds: ArrayLike<number>;
  /** [B·T] labels = input ids with -100 where no loss is taken (transformers' convention). */
  readonly labels: ArrayLike<number>;
}

export interface StepResult {
  /** 1-based optimizer step. */
  readonly step: number;
  /** Mean loss over the step's counted tokens (before the update). */
  readonly loss: number;
  /** Global gradient norm before clipping (unscaled; not finite on a step that overflowed). */
  readonly gradNorm: number;
  /** Learning rate used by this step. */
  readonly lr: number;
  /** Counted (trained) tokens in the step. */
  readonly tokens: number;
  /** Token positions processed (B·T per micro-batch). */
  readonly positions: number;
  readonly seconds: number;
  /** With f16 tile math: the loss scale this step's gradients carried. */
  readonly lossScale?: number;
  /**
   * With f16 tile math: the gradients overflowed at this scale, so AdamW skipped the update (the
   * adapter and its moments are as before the step) and the scale was lowered by its backoff
   * factor (halved by default). The step still
   * counts: its number, its learning rate and AdamW's bias correction are taken, as a pipelined
   * run must before it can know (torch's GradScaler does not count it for Adam's bias correction,
   * which differs where this happens at the first steps).
   */
  readonly overflow?: boolean;
}

/** Bytes by category of what the trainer allocated. */
export interface TrainerMemory {
  readonly frozenWeights: number;
  /** LoRA parameters, gradients and both AdamW moments. */
  readonly trainable: number;
  /** Saved activations of the forward pass. */
  readonly activations: number;
  /** Backward, loss and optimizer scratch. */
  readonly scratch: number;
  readonly total: number;
}

/**
 * What a checkpoint needs from the trainer to continue exactly: the optimizer steps taken and,
 * per adapted module in `resolved.modules` order, A, B and both AdamW moments. Plain arrays in a
 * device-independent layout (no arena padding), so a checkpoint restores on another device.
 */
export interface TrainerState {
  /** Optimizer steps taken (the schedule's position and AdamW's bias-correction count). */
  readonly step: number;
  readonly modules: readonly TrainerModuleState[];
  /** With f16 tile math: the loss scale for the next step and the good steps counted towards its
   * growth. A state without it restores with the configuration's initial scale. */
  readonly lossScale?: { readonly scale: number; readonly goodSteps: number };
}

export interface TrainerModuleState {
  readonly name: string;
  /** [r, in] and [out, r], row-major. */
  readonly a: Float32Array;
  readonly b: Float32Array;
  /** AdamW's exp_avg and exp_avg_sq of A and B. */
  readonly expAvgA: Float32Array;
  readonly expAvgB: Float32Array;
  readonly expAvgSqA: Float32Array;
  readonly expAvgSqB: Float32Array;
}

function resolve(model: CausalLM, lora: LoraConfigInput | ResolvedLora): ResolvedLora {
  if (typeof lora === 'object' && lora !== null && 'modules' in lora && 'config' in lora) return lora as ResolvedLora;
  return resolveLoraTargets(validateLoraConfig(lora), namedModules(model.config), model.config.modelType);
}

/** One submitted step, until its report is read. */
interface InFlight {
  readonly step: number;
  readonly lr: number;
  readonly tokens: number;
  readonly positions: number;
  readonly micro: number;
  readonly t0: number;
  readonly staging: GPUBuffer;
  /** The divergence epoch it was queued in (see LoraTrainer.epoch). */
  readonly epoch: number;
}

export class LoraTrainer {
  /** Steps completed (their reports read, not discarded). */
  private stepCount = 0;
  /** Steps completed or in flight and not known to be discarded: the next step is queued + 1. */
  private queued = 0;
  /** Bumped when a divergence is seen: steps queued in an older epoch were skipped on the GPU. */
  private epoch = 0;
  private divergedStep = 0;
  private inFlight = 0;
  /** The last submitted step's processing; reports are read strictly in order. */
  private tail: Promise<unknown> = Promise.resolve();
  private readonly freeReports: GPUBuffer[] = [];
  private released = false;

  private constructor(
    readonly ctx: GpuContext,
    readonly model: CausalLM,
    readonly resolved: ResolvedLora,
    readonly options: TrainerOptions,
    private readonly params: TensorArena,
    private readonly grads: TensorArena,
    private readonly moments: readonly [TensorArena, TensorArena],
    private readonly trainables: ReadonlyMap<string, LoraTrainable>,
    private readonly fwd: ForwardPlan,
    private readonly bwd: BackwardPlan,
    private readonly inputs: readonly { ids: Tensor; labels: Tensor; dropout?: Tensor }[],
    /** [K, 2] f32: each micro-batch's [loss, count]. */
    private readonly lossLog: Tensor,
    private readonly norm: Tensor,
    /** u32 [1]: AdamW's divergence latch (adamw_step_guarded). */
    private readonly latch: Tensor,
    /** f32 [4]: the loss scale's state (f16 tile math), else undefined. */
    private readonly scaleState: Tensor | undefined,
    /** Every report buffer made (MAP_READ); the free ones are in freeReports. */
    private readonly reports: GPUBuffer[],
    private readonly optimizerDispatches: readonly Dispatch[],
    private readonly adamw: Dispatch,
    private readonly owned: readonly Tensor[],
    /** What was allocated, by category. */
    readonly memory: TrainerMemory,
    /** The estimate checked before allocating (every buffer, by category). */
    readonly estimate: MemoryEstimate,
  ) {
    this.freeReports.push(...reports);
  }

  static async create(ctx: GpuContext, model: CausalLM, options: TrainerOptions): Promise<LoraTrainer> {
    const { B, T, K } = checkTrainingShape('trainer', model.config, options);
    const resolved = resolve(model, options.lora);
    // LoRA dropout: every adapted module masks its branch's input, each with its own mask (its index
    // in resolved.modules) from the seed, the step and the micro-batch (see core's dropout.ts).
    const dropoutP = resolved.config.lora_dropout;
    if (!(dropoutP >= 0 && dropoutP < 1))
      throw new LoraConfigError('lora_dropout', `${dropoutP} is not a probability in [0, 1)`);
    const tileMath = resolvedTileMath(ctx, model, options);
    // Everything the trainer will allocate, checked against the device before any allocation.
    const estimate = estimateMemory(model.config, resolved, {
      batch: B,
      seq: T,
      gradAccum: K,
      recompute: options.recompute,
      precision: model.precision,
      device: ctx,
      tablePartBytes: model.tablePartBytes,
      storedDTypes: model.storedDTypes,
      fuse: options.fuse,
      tileMath,
    });
    checkFits(ctx, estimate, { budget: options.memoryBudget });
    if (options.tileMath === 'f16' && !ctx.features.shaderF16)
      throw new ShapeError('trainer: f16 tile math needs an adapter with shader-f16, and this one has none');
    // Loss scaling goes with the f16 backward; its configuration is checked before anything is made.
    const scaled = tileMath === 'f16';
    if (options.lossScale && !scaled)
      throw new WebtuneError('trainer: lossScale configures the f16 backward, and this run has f32 tile math');
    const scaleConfig = scaled ? resolveLossScale(options.lossScale) : undefined;
    const weights = options.initialWeights ?? initLoraWeights(resolved, options.seed ?? 0);
    const before = ctx.liveBytes;
    const entries = resolved.modules.flatMap((m) => [
      { shape: [...m.aShape], label: `${m.name}.lora_A` },
      { shape: [...m.bShape], label: `${m.name}.lora_B` },
    ]);
    const arenas: TensorArena[] = [];
    const owned: Tensor[] = [];
    const reports: GPUBuffer[] = [];
    const cleanup: { dispose(): void }[] = [];
    try {
      const params = new TensorArena(ctx, entries, 'lora.params');
      const grads = new TensorArena(ctx, entries, 'lora.grads');
      const m1 = new TensorArena(ctx, entries, 'adamw.exp_avg');
      const m2 = new TensorArena(ctx, entries, 'adamw.exp_avg_sq');
      arenas.push(params, grads, m1, m2);
      const trainables = new Map<string, LoraTrainable>();
      resolved.modules.forEach((m, i) => {
        const w = weights.get(m.name);
        if (!w) throw new WebtuneError(`trainer: no initial weights for ${m.name}`);
        const a = params.views[2 * i] as Tensor;
        const b = params.views[2 * i + 1] as Tensor;
        writeTensor(a, w.a);
        writeTensor(b, w.b);
        trainables.set(m.name, {
          a,
          b,
          da: grads.views[2 * i] as Tensor,
          db: grads.views[2 * i + 1] as Tensor,
          scale: m.scale,
          ...(dropoutP > 0 ? { dropout: { p: dropoutP, module: i } } : {}),
        });
      });
      const trainableBytes = ctx.liveBytes - before;

      // The trainer's own buffers, as trainerBuffers (and so estimateMemory) lists them: made before
      // the plans, which read the dropout counter among them.
      const made = new Map<string, Tensor[]>();
      for (const b of trainerBuffers(K, B * T, grads.size, ctx.limits, isCpuAdapter(ctx), dropoutP > 0, scaled)) {
        if (b.label === 'train.report.{i}') {
          for (let i = 0; i < b.count; i++) reports.push(createReport(ctx, K, i));
          continue;
        }
        const list = Array.from({ length: b.count }, (_, k) =>
          createTensor(ctx, [...b.shape], b.dtype, b.label.replace('{k}', String(k))),
        );
        owned.push(...list);
        made.set(b.label, list);
      }
      const one = (label: string) => (made.get(label) as Tensor[])[0] as Tensor;
      // LoRA dropout: the counter the masks hash, and each micro-batch's values copied into it.
      const counter = made.get('train.dropout_counter')?.[0];
      const inputs = (made.get('train.ids.{k}') as Tensor[]).map((ids, k) => ({
        ids,
        labels: (made.get('train.targets.{k}') as Tensor[])[k] as Tensor,
        dropout: made.get('train.dropout.{k}')?.[k],
      }));
      const lossLog = one('train.loss_log');
      const norm = one('train.grad_norm');
      const latch = one('train.adamw_latch');
      const partials = one('train.grad_norm_partials');
      const scaleState = scaleConfig ? one('train.loss_scale') : undefined;
      if (scaleState) writeTensor(scaleState, lossScaleInitialState(scaleConfig));

      const afterArenas = ctx.liveBytes;
      const fwd = await planForward(ctx, model, {
        ...(counter ? { dropoutCounter: counter } : {}),
        B,
        T,
        mode: 'train',
        recompute: options.recompute,
        lora: trainables,
        label: 'train',
        fuse: options.fuse,
        tileMath,
      });
      cleanup.push(fwd);
      const activations = ctx.liveBytes - afterArenas;
      const bwd = await planBackward(ctx, fwd, trainables, scaleState ? { lossScale: scaleState } : {});
      cleanup.push(bwd);

      const normDispatches = await planL2Norm(ctx, { x: grads.tensor, partials, out: norm }, 'grad_norm');
      cleanup.push(...normDispatches);
      const lossScale = scaleState ? { state: scaleState, config: scaleConfig } : undefined;
      const adamw = await planAdamW(
        ctx,
        { norm, grad: grads.tensor, param: params.tensor, m: m1.tensor, v: m2.tensor },
        hyper(options.optimizer),
        { label: 'adamw', guard: { losses: lossLog, count: K, latch }, lossScale },
      );
      cleanup.push(adamw);
      const optimizerDispatches = [...normDispatches, adamw];
      if (scaleState)
        optimizerDispatches.push(await planLossScaleUpdate(ctx, { norm, latch, state: scaleState }, scaleConfig));
      const total = ctx.liveBytes - before;
      const memory: TrainerMemory = {
        frozenWeights: model.bytes,
        trainable: trainableBytes,
        activations,
        scratch: total - trainableBytes - activations,
        total: total + model.bytes,
      };
      return new LoraTrainer(
        ctx,
        model,
        resolved,
        options,
        params,
        grads,
        [m1, m2],
        trainables,
        fwd,
        bwd,
        inputs,
        lossLog,
        norm,
        latch,
        scaleState,
        reports,
        optimizerDispatches,
        adamw,
        owned,
        memory,
        estimate,
      );
    } catch (e) {
      for (const c of cleanup) c.dispose();
      for (const a of arenas) a.dispose();
      for (const t of owned) t.dispose();
      for (const r of reports) ctx.releaseBuffer(r);
      throw e;
    }
  }

  /** The forward projections' tile math (TrainerOptions.tileMath, or trainingTileMath's default). */
  get tileMath(): TileMath {
    return resolvedTileMath(this.ctx, this.model, this.options);
  }

  /** Optimizer steps completed: their results were delivered and they were not discarded. Steps
   * still in flight are not counted yet. */
  get step(): number {
    return this.stepCount;
  }

  /** Steps submitted whose results have not been delivered yet. */
  get pendingSteps(): number {
    return this.inFlight;
  }

  /** The learning rate the next submitted step will use. */
  get nextLearningRate(): number {
    return learningRate(this.schedule(), this.queued);
  }

  private schedule(): LrSchedule {
    return { kind: 'constant', ...this.options.schedule, lr: this.options.optimizer.lr } as LrSchedule;
  }

  /** The adapter's tensors for a forward pass (evaluation, generation with the current adapter). */
  get adapter(): LoraWeightsByModule {
    return new Map([...this.trainables].map(([name, t]) => [name, { a: t.a, b: t.b, scale: t.scale }]));
  }

  /** One optimizer step over `micro` (1..gradAccum micro-batches of B × T): submitStep, then
   * wait for its result (one readback the host waits on). */
  async trainStep(micro: readonly MicroBatch[]): Promise<StepResult> {
    return this.submitStep(micro).result;
  }

  /**
   * Queues one optimizer step over `micro` (1..gradAccum micro-batches of B × T) and returns at
   * once: the step's work is submitted to the GPU before this returns, and nothing in it waits for
   * the host. Call it again before the previous handle resolves to keep the GPU busy (the usual
   * loop: submit step n + 1, then await step n's result); results resolve in submission order.
   *
   * The contract:
   * - Inputs are checked here (ids and labels against the vocabulary, sizes): a bad batch throws
   *   synchronously and queues nothing.
   * - Step numbers, the learning rate and AdamW's bias correction count every step submitted and
   *   not discarded, so a pipelined run is the same run as a sequential one, value for value.
   * - Each step's report (losses, gradient norm, finite flags) comes back in one asynchronous
   *   readback; `result` resolves with it.
   * - Divergence: a step whose loss or gradient is not finite changes nothing on the GPU (AdamW
   *   skips it) and latches, so every step queued behind it skips too. Its handle rejects with
   *   TrainingDivergedError, the handles of the steps queued behind it with StepDiscardedError;
   *   the caller learns of it at most one step late. The adapter and AdamW's moments are then
   *   exactly as they were after the last good step, `step` counts up to it, and the next
   *   submitStep continues from there (with the same step number as the diverged one).
   * - readWeights, evaluate and exportPeft see every step submitted before them; readState waits
   *   for the steps in flight, and restoreState refuses to run while any is.
   */
  submitStep(micro: readonly MicroBatch[]): StepHandle {
    if (this.released) throw new WebtuneError('trainer was disposed');
    const { batch: B, seq: T } = this.options;
    if (micro.length < 1 || micro.length > this.inputs.length) {
      throw new WebtuneError(
        `trainStep: ${micro.length} micro-batches given; this trainer was planned for 1..${this.inputs.length}`,
      );
    }
    const V = this.model.config.vocabSize;
    let counted = 0;
    const targets = micro.map((mb, k) => {
      if (mb.inputIds.length !== B * T || mb.labels.length !== B * T) {
        throw new WebtuneError(
          `trainStep: micro-batch ${k} has ${mb.inputIds.length} ids and ${mb.labels.length} labels; expected ${B}×${T} = ${B * T}`,
        );
      }
      for (let i = 0; i < mb.inputIds.length; i++) {
        const id = mb.inputIds[i] as number;
        if (!Number.isSafeInteger(id) || id < 0 || id >= V)
          throw new WebtuneError(`trainStep: token id ${id} in micro-batch ${k} is outside the vocabulary (${V})`);
      }
      const shifted = shiftLabels(mb.labels, B, T);
      for (const l of shifted) {
        if (l === -100) continue;
        // Checked here rather than after the step: the step must not need a read to be trusted.
        if (!Number.isSafeInteger(l) || l < 0 || l >= V)
          throw new WebtuneError(`trainStep: label ${l} in micro-batch ${k} is outside the vocabulary (${V})`);
        counted++;
      }
      return shifted;
    });
    if (counted === 0) throw new WebtuneError('trainStep: no token to train on in this step (every label is -100)');
    const t0 = performance.now();
    const lr = learningRate(this.schedule(), this.queued);
    const step = this.queued + 1;
    this.bwd.crossEntropy.setDivisor(counted);
    this.adamw.setUniforms(adamwStepUniforms(hyper({ ...this.options.optimizer, lr }), step));
    const report = this.freeReports.pop() ?? createReport(this.ctx, this.inputs.length, this.reports.length);
    if (!this.reports.includes(report)) this.reports.push(report);
    const K = this.inputs.length;
    const enc = new StepEncoder(this.ctx, `train step ${step}`);
    // Unused micro-batch slots hold [0, 0]: finite, so they never trip AdamW's check.
    enc.clear(this.fwd.embeddingErrors).clear(this.bwd.errors).clear(this.lossLog);
    micro.forEach((mb, k) => {
      const input = this.inputs[k] as { ids: Tensor; labels: Tensor; dropout?: Tensor };
      writeTensor(input.ids, Int32Array.from(mb.inputIds as ArrayLike<number>));
      writeTensor(input.labels, targets[k] as Int32Array);
      enc.copy(input.ids, this.fwd.ids).copy(input.labels, this.bwd.labels);
      if (input.dropout && this.fwd.dropout) {
        // This step's masks: from the seed, the step about to be taken and the micro-batch, so a
        // run restored at this step (restoreState) draws the same ones.
        writeTensor(input.dropout, dropoutCounter(this.options.seed ?? 0, step, k));
        enc.copy(input.dropout, this.fwd.dropout.counter);
      }
      enc.dispatch(...this.fwd.dispatches, ...this.bwd.dispatches);
      enc.copy(this.bwd.loss, this.lossLog, 8, 8 * k);
    });
    const at = reportOffsets(K);
    enc
      .dispatch(...this.optimizerDispatches)
      .clear(this.grads.tensor)
      .copy(this.lossLog, report, 8 * K, 0)
      .copy(this.norm, report, 12, at.norm)
      .copy(this.latch, report, 4, at.latch)
      .copy(this.bwd.errors, report, 8, at.errors);
    if (this.scaleState) enc.copy(this.scaleState, report, 16, at.lossScale);
    enc.submit();
    const entry: InFlight = {
      step,
      lr,
      tokens: counted,
      positions: micro.length * B * T,
      micro: micro.length,
      t0,
      staging: report,
      epoch: this.epoch,
    };
    // Asked for now, so the readback is under way while the host prepares the next step.
    const mapped = this.ctx.mapRead(report, 0, reportBytes(K));
    mapped.catch(() => {});
    this.queued = step;
    this.inFlight++;
    const previous = this.tail;
    const result = (async () => {
      try {
        await previous.catch(() => {});
        return await this.finish(entry, mapped);
      } finally {
        this.inFlight--;
      }
    })();
    result.catch(() => {});
    this.tail = result;
    return { step, result };
  }

  /** Reads a step's report (in submission order) and turns it into its result or error. */
  private async finish(e: InFlight, mapped: Promise<void>): Promise<StepResult> {
    await mapped;
    if (this.released) throw new WebtuneError('trainer was disposed');
    const bytes = e.staging.getMappedRange(0, reportBytes(this.inputs.length)).slice(0);
    e.staging.unmap();
    this.freeReports.push(e.staging);
    const K = this.inputs.length;
    const f = new Float32Array(bytes);
    const u = new Uint32Array(bytes);
    if (e.epoch !== this.epoch) throw new StepDiscardedError(e.step, this.divergedStep);
    let loss = 0;
    for (let k = 0; k < e.micro; k++) loss += f[2 * k] as number;
    const at = reportOffsets(K);
    const finite = f[at.norm / 4 + 1];
    const latched = u[at.latch / 4];
    // With a loss scale: the scale this step used (state[2]), by which the norm is divided; a
    // gradient that is not finite is an overflow (skipped, not latched) unless AdamW latched.
    const scale = this.scaleState ? (f[at.lossScale / 4 + 2] as number) : undefined;
    const gradNorm = (f[at.norm / 4] as number) / (scale ?? 1);
    const overflow = scale !== undefined && finite !== 1 && latched === 0 && Number.isFinite(loss);
    if (!Number.isFinite(loss) || (finite !== 1 && !overflow)) {
      // AdamW skipped this step and latched: the steps queued behind it skip too. Clear the latch
      // (queued after them) and continue from the last good step.
      this.epoch++;
      this.divergedStep = e.step;
      this.queued = this.stepCount;
      this.ctx.device.queue.writeBuffer(this.latch.buffer, this.latch.byteOffset, new Uint32Array([0]));
      throw new TrainingDivergedError(e.step, loss, gradNorm);
    }
    if (latched !== 0) throw new WebtuneError(`step ${e.step}: AdamW's latch was set with no divergence seen`);
    if (u[at.errors / 4] !== 0) {
      throw new WebtuneError(
        `trainStep: ${u[at.errors / 4 + 1]} labels outside the vocabulary (${this.model.config.vocabSize})`,
      );
    }
    this.stepCount = e.step;
    return {
      step: e.step,
      loss,
      gradNorm,
      lr: e.lr,
      tokens: e.tokens,
      positions: e.positions,
      seconds: (performance.now() - e.t0) / 1000,
      ...(scale !== undefined ? { lossScale: scale, overflow } : {}),
    };
  }

  /** Resolves once every submitted step's result has been delivered (whatever it was). */
  async settle(): Promise<void> {
    await this.tail.catch(() => {});
  }

  /** Mean loss of the model with the current adapter over examples (no gradient). */
  evaluate(examples: readonly TokenizedExample[], batch = this.options.batch): Promise<EvaluateResult> {
    return evaluateLoss(this.ctx, this.model, examples, { batch, lora: this.adapter });
  }

  /** Reads the adapter's A and B back from the GPU. */
  async readWeights(): Promise<Map<string, LoraWeights>> {
    // One readback of the whole parameter arena, then per-module slices.
    const state = await this.readParams();
    return new Map(state.map((s) => [s.name, { a: s.a, b: s.b }]));
  }

  private async readParams(): Promise<{ name: string; a: Float32Array; b: Float32Array }[]> {
    const params = await readFloat32(this.params.tensor);
    return this.resolved.modules.map((m, i) => ({
      name: m.name,
      a: this.slice(params, 2 * i),
      b: this.slice(params, 2 * i + 1),
    }));
  }

  /** View `view`'s values out of a whole-arena readback (all arenas share one layout). */
  private slice(all: Float32Array, view: number): Float32Array {
    const offset = (this.params.offsets[view] as number) / 4;
    return all.slice(offset, offset + (this.params.views[view] as Tensor).size);
  }

  /** Everything a checkpoint needs to continue this run exactly (see TrainerState). */
  async readState(): Promise<TrainerState> {
    if (this.released) throw new WebtuneError('trainer was disposed');
    // The state of a settled run: steps in flight would make `step` and the arenas disagree.
    await this.settle();
    if (this.released) throw new WebtuneError('trainer was disposed');
    const step = this.stepCount;
    const [params, m1, m2, scale] = await Promise.all([
      readFloat32(this.params.tensor),
      readFloat32(this.moments[0].tensor),
      readFloat32(this.moments[1].tensor),
      this.scaleState ? readFloat32(this.scaleState) : undefined,
    ]);
    const slice = (all: Float32Array, view: number) => this.slice(all, view);
    return {
      step,
      modules: this.resolved.modules.map((m, i) => ({
        name: m.name,
        a: slice(params, 2 * i),
        b: slice(params, 2 * i + 1),
        expAvgA: slice(m1, 2 * i),
        expAvgB: slice(m1, 2 * i + 1),
        expAvgSqA: slice(m2, 2 * i),
        expAvgSqB: slice(m2, 2 * i + 1),
      })),
      ...(scale ? { lossScale: { scale: scale[0] as number, goodSteps: scale[1] as number } } : {}),
    };
  }

  /** Puts a state from readState() back (same adapter layout), so the next step continues that run. */
  restoreState(state: TrainerState): void {
    if (this.released) throw new WebtuneError('trainer was disposed');
    if (!Number.isSafeInteger(state.step) || state.step < 0)
      throw new WebtuneError(`restoreState: step ${state.step} is not a step count`);
    if (this.inFlight > 0)
      throw new WebtuneError(`restoreState: ${this.inFlight} steps are still in flight; await them (settle()) first`);
    const modules = this.resolved.modules;
    // The loss scale first: a bad one throws before anything is written.
    const scale =
      this.scaleState &&
      lossScaleInitialState(this.options.lossScale, state.lossScale?.scale, state.lossScale?.goodSteps ?? 0);
    if (state.modules.length !== modules.length)
      throw new WebtuneError(
        `restoreState: the state has ${state.modules.length} modules, this trainer adapts ${modules.length}`,
      );
    modules.forEach((m, i) => {
      const s = state.modules[i] as TrainerModuleState;
      if (s.name !== m.name)
        throw new WebtuneError(`restoreState: module ${i} is ${s.name} in the state, ${m.name} in this trainer`);
      const put = (arena: TensorArena, view: number, data: Float32Array, what: string) => {
        const t = arena.views[view] as Tensor;
        if (data.length !== t.size)
          throw new WebtuneError(`restoreState: ${m.name}.${what} has ${data.length} values, expected ${t.size}`);
        writeTensor(t, data);
      };
      put(this.params, 2 * i, s.a, 'lora_A');
      put(this.params, 2 * i + 1, s.b, 'lora_B');
      put(this.moments[0], 2 * i, s.expAvgA, 'exp_avg(A)');
      put(this.moments[0], 2 * i + 1, s.expAvgB, 'exp_avg(B)');
      put(this.moments[1], 2 * i, s.expAvgSqA, 'exp_avg_sq(A)');
      put(this.moments[1], 2 * i + 1, s.expAvgSqB, 'exp_avg_sq(B)');
    });
    if (this.scaleState && scale) writeTensor(this.scaleState, scale);
    this.ctx.device.queue.writeBuffer(this.latch.buffer, this.latch.byteOffset, new Uint32Array([0]));
    this.stepCount = state.step;
    this.queued = state.step;
  }

  /** The PEFT adapter folder's two files for the current weights. */
  async exportPeft(options: AdapterConfigOptions): Promise<ReturnType<typeof exportPeftAdapter>> {
    return exportPeftAdapter(this.resolved, await this.readWeights(), options);
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    for (const d of this.optimizerDispatches) d.dispose();
    this.bwd.dispose();
    this.fwd.dispose();
    for (const a of [this.params, this.grads, ...this.moments]) a.dispose();
    for (const t of this.owned) t.dispose();
    // A report still being mapped rejects its step with the mapping's error.
    for (const r of this.reports) this.ctx.releaseBuffer(r);
  }
}

/** A mappable buffer for one step's report. */
function createReport(ctx: GpuContext, K: number, i: number): GPUBuffer {
  return ctx.createBuffer({
    label: `train.report.${i}`,
    size: reportBytes(K),
    usage: 0x1 /* MAP_READ */ | 0x8 /* COPY_DST */,
  });
}

function hyper(o: OptimizerOptions) {
  return {
    lr: o.lr,
    beta1: o.beta1,
    beta2: o.beta2,
    eps: o.eps,
    weightDecay: o.weightDecay ?? 0.01,
    maxNorm: o.maxGradNorm === undefined ? 1 : Number.isFinite(o.maxGradNorm) ? o.maxGradNorm : undefined,
  };
}
