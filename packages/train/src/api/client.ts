/**
 * createTrainer(): the library's one entry point. A Trainer is a thin facade over the engine
 * (engine.ts), which runs in a module Worker (default in browsers) or in this thread; the facade
 * is the same code for both, so they behave the same: callbacks become comlink proxies only when
 * there is a worker, AbortSignals become abort(operationId) calls, and results arrive as Blobs
 * and plain objects either way.
 *
 *   const trainer = await createTrainer();
 *   await trainer.loadModel('HuggingFaceTB/SmolLM2-135M-Instruct', { onProgress });
 *   await trainer.loadDataset(file, { validation: 0.1 });
 *   const run = trainer.train({ steps: 200, lora: { rank: 8 } }, { onProgress });
 *   const { adapter } = await run.done;
 *   const { text } = await trainer.generate('Hello', { adapter: adapter?.name });
 */
import { WebtuneError } from '@webtune/core';
import type { CachedModel } from '@webtune/models';
import { proxy, type Remote, releaseProxy, transfer, wrap } from 'comlink';
import { defaultRunName } from '../run/config.js';
import { CheckpointNotFoundError } from '../store/errors.js';
import type { TrainerEngine } from './engine.js';
import { installErrorTransfer } from './transfer.js';
import type {
  AdapterEntry,
  CheckpointMeta,
  CreateTrainerOptions,
  DatasetInput,
  DatasetStats,
  DeviceInfo,
  ExamplePreview,
  GenerateOptions,
  GenerateResult,
  LoadDatasetOptions,
  LoadModelOptions,
  ModelInfo,
  ModelInput,
  Prompt,
  TrainConfig,
  TrainerProgress,
  TrainingPlan,
  TrainingRun,
  TrainOptions,
  TrainResult,
} from './types.js';

type Engine = TrainerEngine | Remote<TrainerEngine>;

function isNode(): boolean {
  return typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node === 'string';
}

let operations = 0;
function operationId(): string {
  operations++;
  return `op-${Date.now().toString(36)}-${operations}`;
}

/** Starts the worker shipped with the package (bundlers find it by this exact pattern). */
function startWorker(): Worker {
  return new Worker(new URL('./worker.ts', import.meta.url), { type: 'module', name: 'webtune' });
}

/** Rejects when the worker fails to start (a script that does not load would otherwise hang every call). */
function workerFailure(worker: Worker): Promise<never> {
  return new Promise((_, reject) => {
    worker.addEventListener(
      'error',
      (event) => {
        event.preventDefault?.();
        reject(
          new WebtuneError(`the webtune worker failed: ${(event as ErrorEvent).message || 'it could not be loaded'}`),
        );
      },
      { once: true },
    );
  });
}

export async function createTrainer(options: CreateTrainerOptions = {}): Promise<Trainer> {
  const want = options.worker ?? (typeof Worker !== 'undefined' && !isNode());
  const init = {
    ...(options.storage ? { storage: options.storage } : {}),
    ...(options.gpu ? { gpu: options.gpu } : {}),
  };
  if (want === false) {
    // Loaded only here, so a page whose trainer runs in the worker does not download the engine.
    const { TrainerEngine } = await import('./engine.js');
    const engine = new TrainerEngine();
    await engine.init(init);
    return new Trainer(engine, undefined);
  }
  if (typeof Worker === 'undefined')
    throw new WebtuneError('createTrainer: Web Workers are not available here (Node?); use { worker: false }');
  installErrorTransfer();
  const worker = want === true ? startWorker() : want;
  const engine = wrap<TrainerEngine>(worker);
  const failed = workerFailure(worker);
  failed.catch(() => undefined);
  try {
    await Promise.race([engine.init(init), failed]);
  } catch (error) {
    if (want === true) worker.terminate();
    throw error;
  }
  return new Trainer(engine, want === true ? worker : undefined, worker);
}

/** A file or blob of the adapter's folder, or the whole folder as a map. */
export type AdapterImport = FileList | readonly File[] | Readonly<Record<string, Blob>>;

export class Trainer {
  /** The adapter library (IndexedDB in browsers). */
  readonly adapters: AdapterLibrary;
  private disposed = false;

  constructor(
    private readonly engine: Engine,
    /** The worker this trainer started (terminated by dispose()). */
    private readonly ownWorker: Worker | undefined,
    /** The worker it talks to, when there is one. */
    readonly worker?: Worker,
  ) {
    this.adapters = new AdapterLibrary(engine, this.worker !== undefined);
  }

  /** True when the engine runs in a worker. */
  get inWorker(): boolean {
    return this.worker !== undefined;
  }

  /** A callback the engine can call: a comlink proxy across a worker, the function itself here. */
  private callback<F extends (...args: never[]) => unknown>(fn: F | undefined): F | undefined {
    if (fn === undefined) return undefined;
    return (this.worker ? proxy(fn) : fn) as F;
  }

  /** Runs `call` with an operation id that `signal` aborts. */
  private async cancellable<T>(
    signal: AbortSignal | undefined,
    call: (op: string | undefined) => Promise<T>,
  ): Promise<T> {
    if (!signal) return call(undefined);
    signal.throwIfAborted();
    const op = operationId();
    const onAbort = () => void this.engine.abort(op);
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      return await call(op);
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
  }

  private check(): void {
    if (this.disposed) throw new WebtuneError('this trainer was disposed');
  }

  /** The GPU the engine uses (creates the device on first use; WebGpuUnavailableError without one). */
  device(): Promise<DeviceInfo> {
    this.check();
    return this.engine.deviceInfo();
  }

  loadModel(source: ModelInput, options: LoadModelOptions = {}): Promise<ModelInfo> {
    this.check();
    const { onProgress, signal, ...rest } = options;
    const input = source instanceof URL ? source.href : source;
    return this.cancellable(signal, (op) => this.engine.loadModel(input, rest, this.callback(onProgress), op));
  }

  /** Models downloaded and kept for offline use. */
  cachedModels(): Promise<CachedModel[]> {
    return this.engine.cachedModels();
  }

  /** Frees a cached model's disk space (it downloads again next time). */
  deleteCachedModel(id: string): Promise<boolean> {
    return this.engine.deleteCachedModel(id);
  }

  /** The loaded model's description, if any. */
  model(): Promise<ModelInfo | undefined> {
    return this.engine.modelInfo();
  }

  /** Frees the model's GPU memory (and the dataset tokenized for it). */
  releaseModel(): Promise<void> {
    return this.engine.releaseModel();
  }

  loadDataset(input: DatasetInput, options: LoadDatasetOptions = {}): Promise<DatasetStats> {
    this.check();
    const { onProgress, signal, ...rest } = options;
    return this.cancellable(signal, (op) => this.engine.loadDataset(input, rest, this.callback(onProgress), op));
  }

  /** The first tokenized examples, token by token, marking which tokens take loss. */
  previewExamples(start = 0, count = 3, split: 'train' | 'validation' = 'train'): Promise<ExamplePreview[]> {
    return this.engine.previewExamples(start, count, split);
  }

  /** Steps, memory and whether the configuration fits this device, without running it. */
  plan(config: TrainConfig = {}): Promise<TrainingPlan> {
    this.check();
    return this.engine.plan(config);
  }

  /**
   * A run's handle. Progress comes through its own callback, which across a worker is a separate
   * message channel from the calls' answers, so the handle waits for the events a call implies:
   * pause() resolves once 'paused' was delivered, done once 'done' or 'error' was.
   */
  private handle(
    name: string,
    start: (onProgress: (p: TrainerProgress) => void) => Promise<TrainResult>,
    user?: (p: TrainerProgress) => void,
  ): TrainingRun {
    let paused = false;
    let ended = false;
    let wake: (() => boolean)[] = [];
    const until = (ready: () => boolean) =>
      ready()
        ? Promise.resolve()
        : new Promise<void>((resolve) =>
            wake.push(() => {
              if (!ready()) return false;
              resolve();
              return true;
            }),
          );
    const onProgress = (p: TrainerProgress) => {
      if (p.type === 'paused') paused = true;
      if (p.type === 'resumed') paused = false;
      if (p.type === 'done' || p.type === 'error') ended = true;
      try {
        user?.(p);
      } finally {
        wake = wake.filter((w) => !w());
      }
    };
    const settled = (async () => {
      try {
        return await start(onProgress);
      } finally {
        // A call that failed before the run began sends no event.
        await Promise.race([until(() => ended), new Promise((r) => setTimeout(r, 1000))]);
      }
    })();
    // The result is also reported through onProgress; an unobserved failure is not an unhandled rejection.
    settled.catch(() => undefined);
    return {
      name,
      done: settled,
      pause: async () => {
        await this.engine.pauseRun(name);
        await until(() => paused || ended);
      },
      resume: async () => {
        await this.engine.resumeRun(name);
      },
      cancel: () => this.engine.cancelRun(name),
    };
  }

  /** Starts a run; the handle pauses, resumes and cancels it, and `done` gives its result. */
  train(config: TrainConfig = {}, options: TrainOptions = {}): TrainingRun {
    this.check();
    const name = config.name ?? defaultRunName();
    return this.handle(
      name,
      (onProgress) =>
        this.engine.startRun(name, { ...config, name }, false, this.callback(onProgress), options.whenBusy ?? 'error'),
      options.onProgress,
    );
  }

  /** Continues a run from its last checkpoint (after a reload or a crash), with the same model and data loaded. */
  async resumeTraining(name: string, options: TrainOptions = {}): Promise<TrainingRun> {
    this.check();
    const saved = await this.engine.listCheckpoints();
    if (!saved.some((c) => c.name === name)) throw new CheckpointNotFoundError(name);
    return this.handle(
      name,
      (onProgress) => this.engine.startRun(name, {}, true, this.callback(onProgress), options.whenBusy ?? 'error'),
      options.onProgress,
    );
  }

  /** Runs that were checkpointed and not finished: what resumeTraining() can continue. */
  listCheckpoints(): Promise<CheckpointMeta[]> {
    return this.engine.listCheckpoints();
  }

  discardCheckpoint(name: string): Promise<void> {
    return this.engine.discardCheckpoint(name);
  }

  generate(prompt: Prompt, options: GenerateOptions = {}): Promise<GenerateResult> {
    this.check();
    const { onToken, signal, ...rest } = options;
    return this.cancellable(signal, (op) => this.engine.generate(prompt, rest, this.callback(onToken), op));
  }

  /** GPU buffers and bytes alive in the engine (0 once everything is released), and uncaught
   * WebGPU errors since the last call. */
  diagnostics(): Promise<{ liveBuffers: number; liveBytes: number; gpuErrors: string[] }> {
    return this.engine.diagnostics();
  }

  /** Destroys the GPU device as a driver reset would: a running run recovers from its checkpoint. */
  loseDevice(): Promise<void> {
    return this.engine.loseDevice();
  }

  /** Stops runs (keeping their checkpoints for resumeTraining()), frees every GPU buffer and the
   * device, and ends the worker. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.engine.dispose();
    if (this.worker) (this.engine as Remote<TrainerEngine>)[releaseProxy]();
    this.ownWorker?.terminate();
  }
}

export class AdapterLibrary {
  constructor(
    private readonly engine: Engine,
    private readonly remote: boolean,
  ) {}

  /** Newest first. */
  list(): Promise<AdapterEntry[]> {
    return this.engine.listAdapters();
  }

  get(name: string): Promise<AdapterEntry | undefined> {
    return this.engine.getAdapter(name);
  }

  rename(from: string, to: string): Promise<AdapterEntry> {
    return this.engine.renameAdapter(from, to);
  }

  delete(name: string): Promise<void> {
    return this.engine.deleteAdapter(name);
  }

  /** The PEFT folder's two files, as PEFT.from_pretrained, vLLM and llama.cpp read them. */
  async export(name: string): Promise<{ 'adapter_config.json': Blob; 'adapter_model.safetensors': Blob }> {
    const files = await this.engine.exportAdapter(name);
    return {
      'adapter_config.json': new Blob([files.config], { type: 'application/json' }),
      'adapter_model.safetensors': new Blob([files.weights as Uint8Array<ArrayBuffer>], {
        type: 'application/octet-stream',
      }),
    };
  }

  /** The PEFT folder as one zip. */
  async exportZip(name: string): Promise<Blob> {
    const zip = await this.engine.exportZip(name);
    return new Blob([zip as Uint8Array<ArrayBuffer>], { type: 'application/zip' });
  }

  /**
   * A zip to continue training on a cluster with Hugging Face TRL + PEFT (`accelerate launch
   * train.py`): the adapter, the loaded dataset as tokenized JSONL, job.json with the run's
   * settings, and the script. The base model and the adapter's data must be loaded.
   */
  async exportJob(name: string): Promise<Blob> {
    const zip = await this.engine.exportJob(name);
    return new Blob([zip as Uint8Array<ArrayBuffer>], { type: 'application/zip' });
  }

  /** Adds a PEFT adapter: its two files (a picked folder, a drop), a zip of them, or a map of name -> Blob. */
  async import(files: AdapterImport, options: { name?: string } = {}): Promise<AdapterEntry> {
    const list: { name: string; data: Blob | Uint8Array }[] = [];
    if (typeof FileList !== 'undefined' && files instanceof FileList) {
      for (const f of Array.from(files)) list.push({ name: f.name, data: f });
    } else if (Array.isArray(files)) {
      for (const f of files as readonly File[]) list.push({ name: f.name, data: f });
    } else {
      for (const [name, data] of Object.entries(files as Record<string, Blob>)) list.push({ name, data });
    }
    // Blobs cross to a worker by reference; nothing to transfer.
    return this.engine.importAdapter(this.remote ? transfer(list, []) : list, options.name);
  }
}
