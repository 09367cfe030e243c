/**
 * LoRA training on the GPU: the adapter's A and B matrices, their gradients and AdamW's moments
 * live in four arenas of identical layout; one optimizer step is recorded into one command
 * encoder and submitted once:
 *
 *   for each micro-batch k: copy its ids and targets in -> forward -> loss + backward
 *     (gradients accumulate into the gradient arena) -> copy its loss out
 *   global gradient norm -> AdamW with clipping (skipped on the GPU if the norm is not finite)
 *   -> clear the gradient arena
 *
 * The loss divisor is the number of counted tokens over all micro-batches of the step
 * (transformers' num_items_in_batch), so accumulation gives the same gradient as one big batch.
 */
import {
  adamwStepUniforms,
  createTensor,
  type Dispatch,
  dropoutCounter,
  type GpuContext,
  type LrSchedule,
  learningRate,
  planAdamW,
  planL2Norm,
  readFloat32,
  readTensor,
  reducePartialsSize,
  StepEncoder,
  type Tensor,
  TensorArena,
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
  /** Global gradient norm before clipping. */
  readonly gradNorm: number;
  /** Learning rate used by this step. */
  readonly lr: number;
  /** Counted (trained) tokens in the step. */
  readonly tokens: number;
  /** Token positions processed (B·T per micro-batch). */
  readonly positions: number;
  readonly seconds: number;
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

export class LoraTrainer {
  private stepCount = 0;
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
    private readonly lossLog: TensorArena,
    private readonly norm: Tensor,
    private readonly optimizerDispatches: readonly Dispatch[],
    private readonly adamw: Dispatch,
    private readonly owned: readonly Tensor[],
    /** What was allocated, by category. */
    readonly memory: TrainerMemory,
    /** The estimate checked before allocating (every buffer, by category). */
    readonly estimate: MemoryEstimate,
  ) {}

  static async create(ctx: GpuContext, model: CausalLM, options: TrainerOptions): Promise<LoraTrainer> {
    const { B, T, K } = checkTrainingShape('trainer', model.config, options);
    const resolved = resolve(model, options.lora);
    // LoRA dropout: every adapted module masks its branch's input, each with its own mask (its index
    // in resolved.modules) from the seed, the step and the micro-batch (see core's dropout.ts).
    const dropoutP = resolved.config.lora_dropout;
    if (!(dropoutP >= 0 && dropoutP < 1))
      throw new LoraConfigError('lora_dropout', `${dropoutP} is not a probability in [0, 1)`);
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
    });
    checkFits(ctx, estimate, { budget: options.memoryBudget });
    const weights = options.initialWeights ?? initLoraWeights(resolved, options.seed ?? 0);
    const before = ctx.liveBytes;
    const entries = resolved.modules.flatMap((m) => [
      { shape: [...m.aShape], label: `${m.name}.lora_A` },
      { shape: [...m.bShape], label: `${m.name}.lora_B` },
    ]);
    const arenas: TensorArena[] = [];
    const owned: Tensor[] = [];
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

      // The dropout counter the masks hash, and each micro-batch's values copied into it per step.
      const counter = dropoutP > 0 ? createTensor(ctx, [4], 'u32', 'train.dropout_counter') : undefined;
      if (counter) owned.push(counter);
      const afterArenas = ctx.liveBytes;
      const fwd = await planForward(ctx, model, {
        ...(counter ? { dropoutCounter: counter } : {}),
        B,
        T,
        mode: 'train',
        recompute: options.recompute,
        lora: trainables,
        label: 'train',
      });
      cleanup.push(fwd);
      const activations = ctx.liveBytes - afterArenas;
      const bwd = await planBackward(ctx, fwd, trainables);
      cleanup.push(bwd);

      const inputs = Array.from({ length: K }, (_, k) => {
        const ids = createTensor(ctx, [B * T], 'i32', `train.ids.${k}`);
        const labels = createTensor(ctx, [B * T], 'i32', `train.targets.${k}`);
        owned.push(ids, labels);
        const dropout = counter ? createTensor(ctx, [4], 'u32', `train.dropout.${k}`) : undefined;
        if (dropout) owned.push(dropout);
        return { ids, labels, dropout };
      });
      const lossLog = new TensorArena(
        ctx,
        Array.from({ length: K }, (_, k) => ({ shape: [2], label: `train.loss.${k}` })),
        'train.loss_log',
      );
      arenas.push(lossLog);
      const norm = createTensor(ctx, [3], 'f32', 'train.grad_norm');
      const partials = createTensor(ctx, [reducePartialsSize(ctx, grads.size)], 'f32', 'train.grad_norm_partials');
      owned.push(norm, partials);
      const normDispatches = await planL2Norm(ctx, { x: grads.tensor, partials, out: norm }, 'grad_norm');
      const adamw = await planAdamW(
        ctx,
        { norm, grad: grads.tensor, param: params.tensor, m: m1.tensor, v: m2.tensor },
        hyper(options.optimizer),
        { label: 'adamw' },
      );
      const optimizerDispatches = [...normDispatches, adamw];
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
      throw e;
    }
  }

  get step(): number {
    return this.stepCount;
  }

  /** The learning rate the next step will use. */
  get nextLearningRate(): number {
    return learningRate(this.schedule(), this.stepCount);
  }

  private schedule(): LrSchedule {
    return { kind: 'constant', ...this.options.schedule, lr: this.options.optimizer.lr } as LrSchedule;
  }

  /** The adapter's tensors for a forward pass (evaluation, generation with the current adapter). */
  get adapter(): LoraWeightsByModule {
    return new Map([...this.trainables].map(([name, t]) => [name, { a: t.a, b: t.b, scale: t.scale }]));
  }

  /** One optimizer step over `micro` (1..gradAccum micro-batches of B × T). */
  async trainStep(micro: readonly MicroBatch[]): Promise<StepResult> {
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
      for (const l of shifted) if (l !== -100) counted++;
      return shifted;
    });
    if (counted === 0) throw new WebtuneError('trainStep: no token to train on in this step (every label is -100)');
    const t0 = performance.now();
    const lr = learningRate(this.schedule(), this.stepCount);
    // The step counts only once it succeeded: a diverged step leaves the adapter, the moments and
    // the schedule where they were.
    const step = this.stepCount + 1;
    this.bwd.crossEntropy.setDivisor(counted);
    this.adamw.setUniforms(adamwStepUniforms(hyper({ ...this.options.optimizer, lr }), step));
    const enc = new StepEncoder(this.ctx, `train step ${step}`);
    enc.clear(this.fwd.embeddingErrors).clear(this.bwd.errors);
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
      enc.copy(this.bwd.loss, this.lossLog.views[k] as Tensor, 8);
    });
    enc
      .dispatch(...this.optimizerDispatches)
      .clear(this.grads.tensor)
      .submit();
    const losses = await readFloat32(this.lossLog.tensor);
    const [gradNorm, finite] = await readFloat32(this.norm);
    let loss = 0;
    for (let k = 0; k < micro.length; k++) loss += losses[(this.lossLog.offsets[k] as number) / 4] as number;
    if (!Number.isFinite(loss) || finite !== 1) throw new TrainingDivergedError(step, loss, gradNorm as number);
    const errors = await readTensor(this.bwd.errors);
    if (errors[0] !== 0) throw new WebtuneError(`trainStep: ${errors[1]} labels outside the vocabulary (${V})`);
    this.stepCount = step;
    return {
      step,
      loss,
      gradNorm: gradNorm as number,
      lr,
      tokens: counted,
      positions: micro.length * B * T,
      seconds: (performance.now() - t0) / 1000,
    };
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
    const step = this.stepCount;
    const [params, m1, m2] = await Promise.all([
      readFloat32(this.params.tensor),
      readFloat32(this.moments[0].tensor),
      readFloat32(this.moments[1].tensor),
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
    };
  }

  /** Puts a state from readState() back (same adapter layout), so the next step continues that run. */
  restoreState(state: TrainerState): void {
    if (this.released) throw new WebtuneError('trainer was disposed');
    if (!Number.isSafeInteger(state.step) || state.step < 0)
      throw new WebtuneError(`restoreState: step ${state.step} is not a step count`);
    const modules = this.resolved.modules;
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
    this.stepCount = state.step;
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
    for (const a of [this.params, this.grads, ...this.moments, this.lossLog]) a.dispose();
    for (const t of this.owned) t.dispose();
  }
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
