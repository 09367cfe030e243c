/**
 * One training run: the loop that feeds a LoraTrainer batches, reports progress, evaluates,
 * checkpoints, pauses and resumes, survives a lost GPU device, and saves the finished adapter to
 * the library. The library's engine (api/engine.ts) and the CLI both drive runs through it, so the
 * loop lives in one place.
 *
 *   for step = resumed step + 1 .. totalSteps:
 *     pause requested -> checkpoint, 'paused', wait;   cancel requested -> stop
 *     gradAccum batches (fewer at the very end of an epoch-counted run) -> submitStep -> 'step'
 *     every evalEvery steps and at the end: validation loss -> 'eval'
 *     every checkpointEvery steps: checkpoint -> 'checkpoint'
 *   completed: adapter -> library, checkpoint deleted, 'done'
 *
 * Steps are pipelined: step n + 1 is queued on the GPU before step n's result is awaited, so the
 * GPU never waits for the host between steps. A step after which the run reads the adapter (an
 * evaluation, a checkpoint, the last step) is awaited with nothing queued behind it, so what is
 * read is the state after exactly that step; a pause, stop or cancel takes effect after the step
 * already queued (at most one step later than asked).
 *
 * Failures: a diverged step stops the run (TrainingDivergedError) and keeps the last checkpoint;
 * a lost device is replaced (env.recover), the last checkpoint restored and the run goes on
 * ('recovered'); anything else stops it. The trainer's GPU memory is freed on every way out.
 */
import { DeviceLostError, type GpuContext } from '@webtune/core';
import { type CausalLM, NonFiniteLossError, namedModules, type TokenizedExample } from '@webtune/models';
import type { TrainerProgress, TrainResult } from '../api/types.js';
import { type DataCursor, DataLoader, type Example } from '../data/index.js';
import { type LoraWeights, type ResolvedLora, resolveLoraTargets } from '../lora/index.js';

import type { AdapterEntry, CheckpointRecord, TrainerStorage } from '../store/types.js';
import { LoraTrainer, type MicroBatch, type StepHandle } from '../trainer.js';
import { type CheckpointIdentity, checkpointState, makeCheckpoint } from './checkpoint.js';
import { type RunConfig, trainerOptions } from './config.js';

export interface SessionEnvironment {
  /** The device and model, replaced by `recover` after a device loss. */
  ctx: GpuContext;
  model: CausalLM;
  /** Gets a new device and reloads the model on it; without it a lost device ends the run. */
  recover?: (reason: string) => Promise<{ ctx: GpuContext; model: CausalLM }>;
  readonly storage: TrainerStorage;
  readonly identity: CheckpointIdentity;
  readonly train: readonly Example[];
  readonly validation: readonly Example[];
  readonly padId: number;
  /** What the finished adapter's entry and adapter_config.json record about the base model. */
  readonly base: { readonly id: string | null; readonly architecture: string; readonly modelType: string };
  /** A saved adapter to continue (config.from): its resolved targets and weights. */
  readonly start?: { readonly lora: ResolvedLora; readonly weights: ReadonlyMap<string, LoraWeights> };
  readonly emit: (progress: TrainerProgress) => void;
  /** Refuse to start above this many GPU bytes. */
  readonly memoryBudget?: number;
}

/** A step queued on the GPU, with what the step event reports about its batches. */
interface QueuedStep {
  readonly handle: StepHandle;
  readonly tokens: number;
  /** Epochs served once its batches were taken. */
  readonly epoch: number;
}

/** Device losses in a row the run recovers from before it gives up. */
const MAX_RECOVERIES = 3;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** True when `error` came from the device going away (checked on the context, which knows). */
async function deviceWasLost(ctx: GpuContext, error: unknown): Promise<boolean> {
  if (error instanceof DeviceLostError) return true;
  // device.lost resolves a moment after the failed call that revealed it.
  await Promise.race([ctx.lost, sleep(200)]);
  return ctx.isLost;
}

export class TrainingSession {
  private trainer: LoraTrainer | undefined;
  private loader: DataLoader | undefined;
  private losses: [number, number][] = [];
  private validationLosses: [number, number][] = [];
  /** Tokens and seconds before this session (from the checkpoint it resumed). */
  private priorTokens = 0;
  private priorSeconds = 0;
  private sessionTokens = 0;
  private sessionStart = 0;
  private created = Date.now();
  private lastCheckpoint: CheckpointRecord | undefined;
  private recoveries = 0;
  /** The step this session (re)started from, for the ETA. */
  private sessionStartStep = 0;

  private pauseWanted = false;
  private cancelWanted = false;
  private stopWanted = false;
  private paused: { wake: () => void } | undefined;
  private pauseWaiters: (() => void)[] = [];
  private finished = false;

  constructor(
    private readonly env: SessionEnvironment,
    readonly config: RunConfig,
    resumeFrom?: CheckpointRecord,
  ) {
    this.lastCheckpoint = resumeFrom;
  }

  get name(): string {
    return this.config.name;
  }

  /** Resolves once the run is paused (after the current step and its checkpoint), or has ended. */
  pause(): Promise<void> {
    if (this.finished) return Promise.resolve();
    this.pauseWanted = true;
    if (this.paused) return Promise.resolve();
    return new Promise((resolve) => this.pauseWaiters.push(resolve));
  }

  resume(): void {
    this.pauseWanted = false;
    this.paused?.wake();
  }

  cancel(): void {
    this.cancelWanted = true;
    this.paused?.wake();
  }

  /** Ends the run after the current step with its checkpoint saved, to be resumed later (what
   * closing the trainer does to its runs). */
  stop(): void {
    this.stopWanted = true;
    this.paused?.wake();
  }

  private notePaused(): void {
    for (const w of this.pauseWaiters.splice(0)) w();
  }

  private get step(): number {
    return this.trainer?.step ?? 0;
  }

  private elapsed(): number {
    return this.priorSeconds + (performance.now() - this.sessionStart) / 1000;
  }

  /** A new trainer on the current device, at the last checkpoint (or at the start). */
  private async setUp(): Promise<void> {
    const { env, config } = this;
    const lora: ResolvedLora =
      env.start?.lora ?? resolveLoraTargets(config.lora, namedModules(env.model.config), env.model.config.modelType);
    this.trainer = await LoraTrainer.create(
      env.ctx,
      env.model,
      trainerOptions(config, lora, {
        ...(env.start ? { initialWeights: new Map(env.start.weights) } : {}),
        ...(env.memoryBudget === undefined ? {} : { memoryBudget: env.memoryBudget }),
      }),
    );
    const checkpoint = this.lastCheckpoint;
    let cursor: DataCursor | undefined;
    if (checkpoint) {
      this.trainer.restoreState(checkpointState(checkpoint));
      cursor = checkpoint.meta.cursor;
      this.losses = checkpoint.meta.losses.map(([s, l]) => [s, l]);
      this.validationLosses = checkpoint.meta.validationLosses.map(([s, l]) => [s, l]);
      this.priorTokens = checkpoint.meta.tokens;
      this.priorSeconds = checkpoint.meta.seconds;
      this.created = checkpoint.meta.created;
    } else {
      this.losses = [];
      this.validationLosses = [];
      this.priorTokens = 0;
      this.priorSeconds = 0;
    }
    this.loader = new DataLoader(env.train, {
      batch: config.batch,
      seq: config.seq,
      padId: env.padId,
      seed: config.seed,
      ...(cursor ? { cursor } : {}),
    });
    this.sessionTokens = 0;
    this.sessionStart = performance.now();
  }

  private tearDown(): void {
    this.trainer?.dispose();
    this.trainer = undefined;
  }

  /** Batches served so far over the whole run (the cursor counts them per epoch). */
  private batchesServed(): number {
    const loader = this.loader as DataLoader;
    const c = loader.cursor;
    return c.epoch * loader.batchesPerEpoch + Math.ceil(c.position / this.config.batch);
  }

  private async saveCheckpoint(): Promise<void> {
    const trainer = this.trainer as LoraTrainer;
    const record = makeCheckpoint(
      this.config,
      await trainer.readState(),
      {
        cursor: (this.loader as DataLoader).cursor,
        losses: this.losses,
        validationLosses: this.validationLosses,
        tokens: this.priorTokens + this.sessionTokens,
        seconds: this.elapsed(),
        created: this.created,
      },
      this.env.identity,
    );
    await this.env.storage.putCheckpoint(record);
    this.lastCheckpoint = record;
    this.env.emit({ type: 'checkpoint', step: record.meta.step });
  }

  private async evaluate(): Promise<void> {
    const trainer = this.trainer as LoraTrainer;
    const examples: TokenizedExample[] = this.env.validation.map((e) => ({ inputIds: e.inputIds, labels: e.labels }));
    // A validation batch whose loss is not finite does not end the run (the training steps have
    // their own divergence check, which restores the adapter): it is recorded as it came out.
    const loss = await trainer.evaluate(examples, this.config.batch).then(
      (r) => r.loss,
      (e: unknown) => {
        if (e instanceof NonFiniteLossError) return e.loss;
        throw e;
      },
    );
    this.validationLosses.push([trainer.step, loss]);
    this.env.emit({ type: 'eval', step: trainer.step, validationLoss: loss });
  }

  /** Waits while paused (after saving a checkpoint); says whether to go on, or how the run ends. */
  private async gate(): Promise<'go' | 'cancel' | 'stop'> {
    if (this.cancelWanted) return 'cancel';
    if (!this.pauseWanted && !this.stopWanted) return 'go';
    if (this.lastCheckpoint?.meta.step !== this.step) await this.saveCheckpoint();
    if (this.stopWanted) return 'stop';
    this.env.emit({ type: 'paused', step: this.step });
    const pausedAt = performance.now();
    await new Promise<void>((wake) => {
      this.paused = { wake };
      this.notePaused();
      if (!this.pauseWanted || this.cancelWanted || this.stopWanted) wake();
    });
    this.paused = undefined;
    // Time spent paused is not training time.
    this.sessionStart += performance.now() - pausedAt;
    if (this.cancelWanted) return 'cancel';
    if (this.stopWanted) return 'stop';
    this.env.emit({ type: 'resumed', step: this.step });
    return 'go';
  }

  /** Takes the next step's batches and queues it on the GPU without waiting. */
  private submitStep(): QueuedStep {
    const { config } = this;
    const trainer = this.trainer as LoraTrainer;
    const loader = this.loader as DataLoader;
    const micro: MicroBatch[] = [];
    let tokens = 0;
    for (let k = 0; k < config.gradAccum && this.batchesServed() < config.batches; k++) {
      const batch = loader.next();
      if (!batch) break;
      micro.push({ inputIds: batch.inputIds, labels: batch.labels });
      tokens += batch.tokens;
    }
    const handle = trainer.submitStep(micro);
    return { handle, tokens, epoch: this.batchesServed() / loader.batchesPerEpoch };
  }

  /** Whether the run reads the adapter after `step` (so nothing may be queued behind it). */
  private readsAfter(step: number): boolean {
    const { config } = this;
    return (
      step >= config.totalSteps ||
      (this.env.validation.length > 0 && step % config.evalEvery === 0) ||
      (config.checkpointEvery > 0 && step % config.checkpointEvery === 0)
    );
  }

  /** Runs steps until the end, or until the gate says to stop; see the module header. */
  private async steps(): Promise<'done' | 'cancel' | 'stop'> {
    let queued: QueuedStep | undefined;
    try {
      while (this.step < this.config.totalSteps) {
        if (!queued) {
          const next = await this.gate();
          if (next !== 'go') return next;
          queued = this.submitStep();
        }
        const current: QueuedStep = queued;
        queued = undefined;
        const wanted = this.pauseWanted || this.stopWanted || this.cancelWanted;
        if (!wanted && !this.readsAfter(current.handle.step)) {
          try {
            queued = this.submitStep();
          } catch (error) {
            // Bad input in the next batches: let the step in flight finish before reporting it.
            await current.handle.result.catch(() => undefined);
            throw error;
          }
        }
        await this.finishStep(current);
      }
      return 'done';
    } finally {
      // A step queued behind one that failed (diverged, device lost) is discarded by the trainer:
      // wait for it to settle before the trainer is disposed.
      if (queued) await queued.handle.result.catch(() => undefined);
    }
  }

  private async finishStep(queued: QueuedStep): Promise<void> {
    const { config } = this;
    const r = await queued.handle.result;
    const tokens = queued.tokens;
    this.sessionTokens += tokens;
    this.losses.push([r.step, r.loss]);
    const seconds = (performance.now() - this.sessionStart) / 1000;
    const stepsThisSession = r.step - this.sessionStartStep;
    this.env.emit({
      type: 'step',
      step: r.step,
      totalSteps: config.totalSteps,
      loss: r.loss,
      lr: r.lr,
      gradNorm: r.gradNorm,
      tokensPerSecond: seconds > 0 ? this.sessionTokens / seconds : 0,
      etaSeconds: stepsThisSession > 0 ? (seconds / stepsThisSession) * (config.totalSteps - r.step) : 0,
      epoch: queued.epoch,
      ...(r.lossScale !== undefined ? { lossScale: r.lossScale, overflow: r.overflow ?? false } : {}),
    });
    if (this.env.validation.length > 0 && (r.step % config.evalEvery === 0 || r.step === config.totalSteps))
      await this.evaluate();
    if (config.checkpointEvery > 0 && r.step % config.checkpointEvery === 0 && r.step < config.totalSteps)
      await this.saveCheckpoint();
  }

  /** Runs to the end (or until cancelled); see the module header. */
  async run(): Promise<TrainResult> {
    try {
      await this.setUp();
      this.sessionStartStep = this.step;
      for (;;) {
        try {
          const how = await this.steps();
          if (how !== 'done') return await this.ended(how);
          break;
        } catch (error) {
          if (!(await deviceWasLost(this.env.ctx, error)) || !this.env.recover || this.recoveries >= MAX_RECOVERIES)
            throw error;
          this.recoveries++;
          const reason = error instanceof Error ? error.message : String(error);
          this.tearDown();
          const fresh = await this.env.recover(reason);
          this.env.ctx = fresh.ctx;
          this.env.model = fresh.model;
          await this.setUp();
          this.sessionStartStep = this.step;
          this.env.emit({ type: 'recovered', step: this.step, reason });
        }
      }
      return await this.complete();
    } catch (error) {
      this.env.emit({
        type: 'error',
        message: error instanceof Error ? error.message : String(error),
        name: error instanceof Error ? error.name : 'Error',
      });
      throw error;
    } finally {
      this.finished = true;
      this.notePaused();
      this.tearDown();
    }
  }

  private lastLoss(): number | undefined {
    return this.losses.at(-1)?.[1];
  }

  /** Cancelled: the checkpoint is discarded. Stopped: it is kept for resumeTraining(). */
  private async ended(how: 'cancel' | 'stop'): Promise<TrainResult> {
    if (how === 'cancel') await this.env.storage.deleteCheckpoint(this.config.name);
    const result: TrainResult = {
      name: this.config.name,
      status: how === 'cancel' ? 'cancelled' : 'stopped',
      steps: this.step,
      totalSteps: this.config.totalSteps,
      trainLoss: this.lastLoss(),
      validationLoss: this.validationLosses.at(-1)?.[1],
      adapter: undefined,
      tokens: this.priorTokens + this.sessionTokens,
      seconds: this.elapsed(),
    };
    this.env.emit({ type: 'done', result });
    return result;
  }

  private async complete(): Promise<TrainResult> {
    const trainer = this.trainer as LoraTrainer;
    const { env, config } = this;
    const files = await trainer.exportPeft({
      baseModelNameOrPath: env.base.id,
      architecture: env.base.architecture,
      modelType: env.base.modelType,
    });
    const config_ = files['adapter_config.json'];
    const weights = files['adapter_model.safetensors'];
    const entry: AdapterEntry = {
      name: config.name,
      baseModel: env.base.id,
      baseFingerprint: env.identity.baseModel.fingerprint,
      config: trainer.resolved.config,
      steps: trainer.step,
      ...(this.lastLoss() === undefined ? {} : { trainLoss: this.lastLoss() }),
      ...(this.validationLosses.length ? { validationLoss: this.validationLosses.at(-1)?.[1] } : {}),
      created: Date.now(),
      bytes: config_.length + weights.byteLength,
      origin: 'trained',
      datasetFingerprint: env.identity.dataset.fingerprint,
      training: config as unknown as Record<string, unknown>,
    };
    await env.storage.putAdapter(entry, { config: config_, weights }, { overwrite: true });
    await env.storage.deleteCheckpoint(config.name);
    const result: TrainResult = {
      name: config.name,
      status: 'completed',
      steps: trainer.step,
      totalSteps: config.totalSteps,
      trainLoss: this.lastLoss(),
      validationLoss: this.validationLosses.at(-1)?.[1],
      adapter: entry,
      tokens: this.priorTokens + this.sessionTokens,
      seconds: this.elapsed(),
    };
    env.emit({ type: 'done', result });
    return result;
  }
}
