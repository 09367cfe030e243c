/**
 * The engine behind createTrainer(): one GPU device, one loaded model and tokenizer, one dataset,
 * the adapter library and the training runs. It runs where the trainer runs (a Web Worker, or
 * the calling thread) and every method takes and returns plain data, so the worker exposes it
 * through comlink as it is; callbacks arrive as comlink proxies (or plain functions in-thread),
 * and cancellation as abort(operationId), since an AbortSignal cannot cross to a worker.
 *
 * Users do not call it directly: the Trainer facade (client.ts) gives it the same shape in both
 * places.
 */
import { createGpuContext, type GpuContext, WebtuneError } from '@webtune/core';
import {
  type CachedModel,
  type CausalLM,
  type ChatMessage,
  deleteCachedModel,
  filesSource,
  GenerationCancelled,
  Generator,
  ggufFingerprint,
  listCachedModels,
  loadGgufTokenizer,
  loadModel,
  loadTokenizer,
  modelFingerprint,
  namedModules,
  parameterCount,
  type Tokenizer,
} from '@webtune/models';
import { releaseProxy, transfer } from 'comlink';
import { strToU8, unzipSync, zipSync } from 'fflate';
import { type LoadedAdapter, loadAdapter } from '../adapter.js';
import { padIdOf } from '../data/index.js';
import { buildTrainingJob } from '../job/index.js';
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  importPeftAdapter,
  PEFT_DEFAULT_TARGET_MODULES,
  parseAdapterConfig,
  resolveLoraTargets,
} from '../lora/index.js';
import { checkFits, estimateMemory } from '../memory.js';
import { checkpointConfig } from '../run/checkpoint.js';
import { type RunConfig, resolveRunConfig } from '../run/config.js';
import { type SessionEnvironment, TrainingSession } from '../run/session.js';
import { DirectoryStorage } from '../store/directory.js';
import { AdapterExistsError, AdapterNotFoundError, CheckpointNotFoundError, checkName } from '../store/errors.js';
import { IndexedDbStorage } from '../store/indexeddb.js';
import type { AdapterEntry, CheckpointMeta, TrainerStorage } from '../store/types.js';
import { DEFAULT_SEQ, type EngineDataset, loadEngineDataset } from './dataset.js';
import { BaseModelMismatchError, NoSuchRunError, NotLoadedError, RunMismatchError } from './errors.js';
import { withTrainingLock } from './locks.js';
import { openModelInput } from './sources.js';
import {
  type CreateTrainerOptions,
  type DatasetInput,
  type DatasetStats,
  type DeviceInfo,
  type ExamplePreview,
  type GenerateOptions,
  type GenerateResult,
  type LoadDatasetOptions,
  type LoadModelOptions,
  type ModelInfo,
  type ModelInput,
  type Prompt,
  type StorageOptions,
  type TrainConfig,
  type TrainerProgress,
  type TrainingPlan,
  type TrainResult,
  weightsProgress,
} from './types.js';

export type ProgressCallback = (progress: TrainerProgress) => void;

/** Options that cross to the engine: no callbacks, no signal. */
export type EngineLoadModelOptions = Omit<LoadModelOptions, 'onProgress' | 'signal'>;
export type EngineLoadDatasetOptions = Omit<LoadDatasetOptions, 'onProgress' | 'signal'>;
export type EngineGenerateOptions = Omit<GenerateOptions, 'onToken' | 'signal'>;
export interface EngineInit {
  storage?: StorageOptions;
  gpu?: CreateTrainerOptions['gpu'];
}

/** Adapters kept on the GPU for generation (least recently used ones are freed first). */
const RESIDENT_ADAPTERS = 4;

interface LoadedModel {
  readonly model: CausalLM;
  readonly tokenizer: Tokenizer;
  readonly info: ModelInfo;
  /** How to load it again (after a lost device). */
  readonly input: ModelInput;
  readonly options: EngineLoadModelOptions;
}

/** Callbacks that came through comlink hold a message port until released. A plain function (the
 * in-thread trainer) has no such property; a comlink proxy answers every property. */
function release(callback: unknown): void {
  if (typeof callback !== 'function') return;
  const releaser = (callback as unknown as Record<symbol, unknown>)[releaseProxy];
  if (typeof releaser === 'function') releaser.call(callback);
}

function isNode(): boolean {
  return typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node === 'string';
}

async function defaultStorage(): Promise<TrainerStorage> {
  if (typeof indexedDB !== 'undefined') return new IndexedDbStorage('webtune');
  if (isNode()) {
    const os = (await import(/* @vite-ignore */ 'node:os')) as typeof import('node:os');
    const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env ?? {};
    return new DirectoryStorage(env.WEBTUNE_HOME ?? `${os.homedir()}/.cache/webtune/library`);
  }
  throw new WebtuneError('no storage for adapters: IndexedDB is not available here; pass { storage }');
}

/** A run's pause/resume/cancel, usable before the session exists (while it waits for the lock). */
class RunControl {
  private session: TrainingSession | undefined;
  private pauseWanted = false;
  private cancelWanted = false;
  private stopWanted = false;
  private waiters: (() => void)[] = [];

  attach(session: TrainingSession): void {
    this.session = session;
    if (this.cancelWanted) session.cancel();
    else if (this.stopWanted) session.stop();
    else if (this.pauseWanted) void session.pause().then(() => this.settle());
  }

  pause(): Promise<void> {
    if (this.session) return this.session.pause();
    this.pauseWanted = true;
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  resume(): void {
    this.pauseWanted = false;
    this.session?.resume();
    this.settle();
  }

  cancel(): void {
    this.cancelWanted = true;
    this.session?.cancel();
  }

  stop(): void {
    this.stopWanted = true;
    this.session?.stop();
  }

  settle(): void {
    for (const w of this.waiters.splice(0)) w();
  }
}

export class TrainerEngine {
  private storage: TrainerStorage | undefined;
  private gpuOptions: EngineInit['gpu'] = {};
  private ctx: GpuContext | undefined;
  private loaded: LoadedModel | undefined;
  private dataset: EngineDataset | undefined;
  private readonly runs = new Map<string, RunControl>();
  private readonly operations = new Map<string, AbortController>();
  private readonly residents = new Map<string, LoadedAdapter>();
  private disposed = false;

  async init(options: EngineInit = {}): Promise<void> {
    this.gpuOptions = options.gpu ?? {};
    const s = options.storage;
    this.storage =
      s === undefined
        ? await defaultStorage()
        : 'indexedDb' in s
          ? new IndexedDbStorage(s.indexedDb)
          : new DirectoryStorage(s.directory);
  }

  // ---- plumbing -----------------------------------------------------------------------------

  private store(): TrainerStorage {
    if (!this.storage) throw new WebtuneError('the trainer was not initialised');
    return this.storage;
  }

  private async device(): Promise<GpuContext> {
    if (this.disposed) throw new WebtuneError('the trainer was disposed');
    if (!this.ctx || this.ctx.isLost) {
      this.ctx = await createGpuContext({
        label: 'webtune',
        ...(this.gpuOptions?.powerPreference ? { powerPreference: this.gpuOptions.powerPreference } : {}),
        ...(this.gpuOptions?.featureLevel ? { featureLevel: this.gpuOptions.featureLevel } : {}),
        ...(this.gpuOptions?.kernelProfile ? { kernelProfile: this.gpuOptions.kernelProfile } : {}),
        ...(this.gpuOptions?.matmulStaging ? { matmulStaging: this.gpuOptions.matmulStaging } : {}),
      });
    }
    return this.ctx;
  }

  /** An AbortSignal for a cancellable call; abort(id) fires it. */
  private begin(id: string | undefined): AbortSignal | undefined {
    if (id === undefined) return undefined;
    const controller = new AbortController();
    this.operations.set(id, controller);
    return controller.signal;
  }

  private end(id: string | undefined): void {
    if (id !== undefined) this.operations.delete(id);
  }

  /** Cancels the call started with this operation id (a download, a generation). */
  abort(id: string): void {
    this.operations.get(id)?.abort(new DOMException('the operation was aborted', 'AbortError'));
  }

  private async requireModel(call: string): Promise<LoadedModel> {
    if (!this.loaded) throw new NotLoadedError('model', call);
    if (this.ctx?.isLost) await this.recoverDevice('the device was lost while idle');
    return this.loaded;
  }

  private requireDataset(call: string): EngineDataset {
    if (!this.dataset) throw new NotLoadedError('dataset', call);
    return this.dataset;
  }

  private trainingActive(): boolean {
    return this.runs.size > 0;
  }

  // ---- device -------------------------------------------------------------------------------

  async deviceInfo(): Promise<DeviceInfo> {
    const ctx = await this.device();
    return {
      description: `${ctx.adapter.vendor} ${ctx.adapter.architecture} ${ctx.adapter.device}`.trim(),
      software:
        ctx.adapter.isFallbackAdapter ||
        /swiftshader|llvmpipe|lavapipe/i.test(ctx.adapter.architecture + ctx.adapter.description),
      maxBufferSize: ctx.limits.maxBufferSize,
      maxStorageBufferBindingSize: ctx.limits.maxStorageBufferBindingSize,
      features: Object.entries(ctx.features)
        .filter(([, on]) => on)
        .map(([name]) => name),
    };
  }

  /**
   * Gets a new device after the old one was lost, and loads the model on it again (from the
   * download cache or the same files). Adapters resident for generation are dropped.
   */
  private async recoverDevice(_reason: string): Promise<{ ctx: GpuContext; model: CausalLM }> {
    const old = this.loaded;
    if (!old) throw new NotLoadedError('model', 'recover');
    this.dropResidents();
    old.model.dispose();
    this.ctx = undefined;
    const ctx = await this.device();
    const opened = await openModelInput(old.input, old.options);
    const model = await loadModel(ctx, opened.source, {
      ...(old.options.precision ? { precision: old.options.precision } : {}),
      ...(opened.gguf ? { gguf: opened.gguf } : {}),
    });
    this.loaded = { ...old, model };
    return { ctx, model };
  }

  /** Destroys the GPU device as a driver reset would (to exercise recovery in tests and demos). */
  async loseDevice(): Promise<void> {
    this.ctx?.device.destroy();
  }

  // ---- model --------------------------------------------------------------------------------

  async loadModel(
    input: ModelInput,
    options: EngineLoadModelOptions = {},
    onProgress?: ProgressCallback,
    operation?: string,
  ): Promise<ModelInfo> {
    const signal = this.begin(operation);
    try {
      if (this.trainingActive())
        throw new WebtuneError(
          'loadModel: a training run is using the current model; cancel it or let it finish first',
        );
      const opened = await openModelInput(input, {
        ...options,
        ...(signal ? { signal } : {}),
        onDownload: (p) => onProgress?.({ type: 'download', ...p }),
      });
      const ctx = await this.device();
      const gguf = opened.gguf;
      const [tokenizer, fingerprint] = await Promise.all([
        gguf ? loadGgufTokenizer(opened.source, gguf) : loadTokenizer(opened.source),
        gguf ? ggufFingerprint(opened.source, gguf) : modelFingerprint(opened.source),
      ]);
      signal?.throwIfAborted();
      // The previous model, its dataset and adapters go first: their GPU memory is needed.
      this.unloadModel();
      // A GGUF file keeps each tensor's format unless a precision is asked for.
      const precision = options.precision ?? (gguf ? undefined : 'f16');
      const model = await loadModel(ctx, opened.source, {
        ...(precision ? { precision } : {}),
        ...(gguf ? { gguf } : {}),
        ...(signal ? { signal } : {}),
        onProgress: (p) => {
          if (p.status === 'weights') onProgress?.(weightsProgress(p));
        },
      });
      const c = model.config;
      const linear = namedModules(c).filter((m) => m.kind === 'linear' || m.kind === 'conv1d');
      const defaults = PEFT_DEFAULT_TARGET_MODULES[c.modelType];
      const info: ModelInfo = {
        // A GGUF file may name the Hub model it was converted from: adapters record that.
        id: options.id ?? model.baseModelId ?? opened.id,
        architecture: c.architecture,
        modelType: c.modelType,
        parameters: parameterCount(c),
        layers: c.numLayers,
        hiddenSize: c.hiddenSize,
        vocabSize: c.vocabSize,
        maxPositions: c.maxPositions,
        modules: [...new Set(linear.map((m) => m.name.split('.').pop() as string))],
        defaultTargets: defaults === undefined ? [] : typeof defaults === 'string' ? [defaults] : [...defaults],
        bytes: model.bytes,
        precision: model.precision,
        fingerprint,
        hasChatTemplate: tokenizer.hasChatTemplate,
        device: await this.deviceInfo(),
      };
      this.loaded = { model, tokenizer, info, input, options };
      return info;
    } finally {
      this.end(operation);
      release(onProgress);
    }
  }

  /** Models downloaded and kept for offline use (Cache API in browsers, a folder under Node). */
  cachedModels(): Promise<CachedModel[]> {
    return listCachedModels();
  }

  deleteCachedModel(id: string): Promise<boolean> {
    return deleteCachedModel(id);
  }

  async modelInfo(): Promise<ModelInfo | undefined> {
    return this.loaded?.info;
  }

  /** Frees the model, its dataset and resident adapters (GPU memory back to zero). */
  async releaseModel(): Promise<void> {
    if (this.trainingActive()) throw new WebtuneError('releaseModel: a training run is using the model');
    this.unloadModel();
  }

  private unloadModel(): void {
    this.dropResidents();
    this.dataset = undefined;
    this.loaded?.model.dispose();
    this.loaded = undefined;
  }

  // ---- data ---------------------------------------------------------------------------------

  async loadDataset(
    input: DatasetInput,
    options: EngineLoadDatasetOptions = {},
    onProgress?: ProgressCallback,
    _operation?: string,
  ): Promise<DatasetStats> {
    try {
      const { tokenizer, info } = await this.requireModel('loadDataset');
      if (this.trainingActive())
        throw new WebtuneError(
          'loadDataset: a training run is using the current dataset; cancel it or let it finish first',
        );
      const seq = options.seq ?? Math.min(DEFAULT_SEQ, info.maxPositions);
      const dataset = await loadEngineDataset(tokenizer, input, {
        ...options,
        seq,
        ...(onProgress ? { onProgress } : {}),
      });
      this.dataset = dataset;
      return dataset.stats;
    } finally {
      release(onProgress);
    }
  }

  async datasetStats(): Promise<DatasetStats | undefined> {
    return this.dataset?.stats;
  }

  /** The first tokenized examples, token by token, with which tokens take loss. */
  async previewExamples(start = 0, count = 3, split: 'train' | 'validation' = 'train'): Promise<ExamplePreview[]> {
    const { tokenizer } = await this.requireModel('previewExamples');
    const examples = this.requireDataset('previewExamples')[split];
    return examples.slice(start, start + count).map((e, i) => {
      // Each token's text as it reads in context (its leading space kept; the bytes of a character
      // split over several tokens shown with the token that completes it).
      const decoder = tokenizer.streamDecoder();
      const tokens = Array.from(e.inputIds, (id, t) => ({
        id,
        text: decoder.push(id),
        trained: t > 0 && e.labels[t] !== -100,
      }));
      const rest = decoder.flush();
      if (rest && tokens.length > 0) (tokens[tokens.length - 1] as { text: string }).text += rest;
      return {
        index: start + i,
        ...(e.line === undefined ? {} : { line: e.line }),
        truncated: e.fullLength !== undefined,
        tokens,
      };
    });
  }

  // ---- training -----------------------------------------------------------------------------

  private async runConfig(config: TrainConfig): Promise<{ run: RunConfig; start?: SessionEnvironment['start'] }> {
    const { model, info } = await this.requireModel('train');
    const dataset = this.requireDataset('train');
    let start: SessionEnvironment['start'];
    if (config.from !== undefined) {
      const files = await this.store().readAdapterFiles(config.from);
      const entry = await this.store().getAdapter(config.from);
      if (!files || !entry) throw new AdapterNotFoundError(config.from);
      this.checkAdapterBase(entry, info);
      const imported = importPeftAdapter(
        { config: files.config, safetensors: files.weights },
        namedModules(model.config),
        model.config.modelType,
      );
      start = { lora: imported.resolved, weights: imported.weights };
    }
    const run = resolveRunConfig(config, {
      stats: dataset.stats,
      datasetSeq: dataset.stats.seq,
      longestExample: dataset.longest,
      maxPositions: info.maxPositions,
      ...(start ? { fromConfig: start.lora.config } : {}),
    });
    return { run, ...(start ? { start } : {}) };
  }

  /** Steps, memory and whether a configuration fits, before it runs. */
  async plan(config: TrainConfig): Promise<TrainingPlan> {
    const { model } = await this.requireModel('plan');
    const { run, start } = await this.runConfig(config);
    const lora = start?.lora ?? resolveLoraTargets(run.lora, namedModules(model.config), model.config.modelType);
    const ctx = await this.device();
    const memory = estimateMemory(model.config, lora, {
      batch: run.batch,
      seq: run.seq,
      gradAccum: run.gradAccum,
      recompute: run.recompute,
      precision: model.precision,
      device: ctx,
      tablePartBytes: model.tablePartBytes,
      storedDTypes: model.storedDTypes,
      ...(run.tileMath ? { tileMath: run.tileMath } : {}),
    });
    let problem: string | undefined;
    try {
      checkFits(ctx, memory);
    } catch (error) {
      problem = error instanceof Error ? error.message : String(error);
    }
    return {
      totalSteps: run.totalSteps,
      epochs: run.epochs,
      tokensPerStep: run.batch * run.seq * run.gradAccum,
      memory,
      fits: problem === undefined,
      ...(problem === undefined ? {} : { problem }),
      trainableParameters: memory.settings.trainableParameters,
      adaptedModules: memory.settings.adaptedModules,
    };
  }

  private checkAdapterBase(entry: AdapterEntry, info: ModelInfo): void {
    if (entry.baseFingerprint !== undefined && entry.baseFingerprint !== info.fingerprint) {
      throw new BaseModelMismatchError(entry.name, entry.baseModel, info.id);
    }
  }

  /**
   * Trains until the run completes or is cancelled; `name` is the run's (and the adapter's) name.
   * `resume`: continue the run's checkpoint instead of starting. pauseRun/resumeRun/cancelRun
   * control it meanwhile.
   */
  async startRun(
    name: string,
    config: TrainConfig,
    resume: boolean,
    onProgress?: ProgressCallback,
    whenBusy: 'wait' | 'error' = 'error',
  ): Promise<TrainResult> {
    checkName(name, 'run name');
    if (this.runs.has(name)) throw new WebtuneError(`a run named ${JSON.stringify(name)} is already active`);
    const control = new RunControl();
    this.runs.set(name, control);
    try {
      return await withTrainingLock(whenBusy, async () => {
        const { model, info } = await this.requireModel(resume ? 'resumeTraining' : 'train');
        const dataset = this.requireDataset(resume ? 'resumeTraining' : 'train');
        const storage = this.store();
        let run: RunConfig;
        let start: SessionEnvironment['start'];
        const checkpoint = resume ? await storage.readCheckpoint(name) : undefined;
        if (resume) {
          if (!checkpoint) throw new CheckpointNotFoundError(name);
          const meta = checkpoint.meta;
          if (meta.baseModel.fingerprint !== info.fingerprint)
            throw new RunMismatchError(
              name,
              'model',
              `it was training ${meta.baseModel.id ?? 'another model'} (weights ${meta.baseModel.fingerprint}); the loaded model is ${info.id} (weights ${info.fingerprint}). Load the same model first`,
            );
          if (meta.dataset.fingerprint !== dataset.stats.fingerprint)
            throw new RunMismatchError(
              name,
              'dataset',
              `it was trained on other data (${meta.dataset.examples} + ${meta.dataset.validation} examples, fingerprint ${meta.dataset.fingerprint}); the loaded data has ${dataset.stats.examples} + ${dataset.stats.validation} (fingerprint ${dataset.stats.fingerprint}). Load the same file with the same sequence length, split and seed`,
            );
          run = checkpointConfig(meta);
        } else {
          if ((await storage.readCheckpoint(name)) !== undefined)
            throw new WebtuneError(
              `a paused run named ${JSON.stringify(name)} has a checkpoint: resume it with resumeTraining(), discard it with discardCheckpoint(), or choose another name`,
            );
          if (!config.overwrite && (await storage.getAdapter(name))) throw new AdapterExistsError(name);
          ({ run, start } = await this.runConfig({ ...config, name }));
        }
        const session = new TrainingSession(
          {
            ctx: await this.device(),
            model,
            recover: (reason) => this.recoverDevice(reason),
            storage,
            identity: {
              baseModel: { id: info.id, fingerprint: info.fingerprint },
              dataset: {
                fingerprint: dataset.stats.fingerprint,
                examples: dataset.stats.examples,
                validation: dataset.stats.validation,
              },
            },
            train: dataset.train,
            validation: dataset.validation,
            padId: padIdOf(this.loaded?.tokenizer as Tokenizer),
            base: { id: info.id, architecture: info.architecture, modelType: info.modelType },
            ...(start ? { start } : {}),
            emit: (p) => onProgress?.(p),
          },
          run,
          checkpoint,
        );
        control.attach(session);
        return await session.run();
      });
    } finally {
      this.runs.delete(name);
      control.settle();
      release(onProgress);
    }
  }

  private control(name: string): RunControl {
    const control = this.runs.get(name);
    if (!control) throw new NoSuchRunError(name);
    return control;
  }

  async pauseRun(name: string): Promise<void> {
    await this.control(name).pause();
  }

  async resumeRun(name: string): Promise<void> {
    this.control(name).resume();
  }

  async cancelRun(name: string): Promise<void> {
    this.control(name).cancel();
  }

  /** Runs active in this engine (running, paused, or waiting for the GPU). */
  async activeRuns(): Promise<string[]> {
    return [...this.runs.keys()];
  }

  listCheckpoints(): Promise<CheckpointMeta[]> {
    return this.store().listCheckpoints();
  }

  async discardCheckpoint(name: string): Promise<void> {
    if (this.runs.has(name)) throw new WebtuneError(`run ${JSON.stringify(name)} is active; cancel it instead`);
    await this.store().deleteCheckpoint(name);
  }

  // ---- generation ---------------------------------------------------------------------------

  private dropResidents(): void {
    for (const a of this.residents.values()) a.dispose();
    this.residents.clear();
  }

  /** A library adapter's tensors on the GPU (uploaded once; the base weights are never touched). */
  private async resident(name: string): Promise<LoadedAdapter> {
    const cached = this.residents.get(name);
    if (cached) {
      this.residents.delete(name);
      this.residents.set(name, cached);
      return cached;
    }
    const { model, info } = await this.requireModel('generate');
    const entry = await this.store().getAdapter(name);
    const files = await this.store().readAdapterFiles(name);
    if (!entry || !files) throw new AdapterNotFoundError(name);
    this.checkAdapterBase(entry, info);
    const source = filesSource(
      [
        Object.assign(new Blob([files.config]), { name: ADAPTER_CONFIG_FILE }),
        Object.assign(new Blob([files.weights as Uint8Array<ArrayBuffer>]), { name: ADAPTER_WEIGHTS_FILE }),
      ],
      `adapter ${name}`,
    );
    const loaded = await loadAdapter(await this.device(), model, source);
    this.residents.set(name, loaded);
    while (this.residents.size > RESIDENT_ADAPTERS) {
      const [oldest, adapter] = this.residents.entries().next().value as [string, LoadedAdapter];
      adapter.dispose();
      this.residents.delete(oldest);
    }
    return loaded;
  }

  async generate(
    prompt: Prompt,
    options: EngineGenerateOptions = {},
    onToken?: (text: string) => void,
    operation?: string,
  ): Promise<GenerateResult> {
    const signal = this.begin(operation);
    try {
      const { model, tokenizer, info } = await this.requireModel('generate');
      const chat = options.chat ?? (typeof prompt !== 'string' || tokenizer.hasChatTemplate);
      let ids: number[];
      if (chat) {
        const messages: ChatMessage[] =
          typeof prompt === 'string' ? [{ role: 'user', content: prompt }] : (prompt as ChatMessage[]);
        ids = tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }).ids;
      } else {
        ids = tokenizer.encode(prompt as string);
      }
      if (ids.length === 0) {
        const start = tokenizer.bosTokenId ?? tokenizer.eosTokenIds[0];
        if (start === undefined) throw new WebtuneError('generate: the prompt is empty and the model has no BOS token');
        ids = [start];
      }
      const maxTokens = options.maxTokens ?? 128;
      const adapter = options.adapter ? await this.resident(options.adapter) : undefined;
      const generator = await Generator.create(await this.device(), model, {
        maxSequence: Math.min(ids.length + maxTokens + 1, info.maxPositions),
        ...(adapter ? { lora: adapter.weights } : {}),
      });
      const decoder = tokenizer.streamDecoder({ context: ids, skipSpecialTokens: true });
      let text = '';
      const emit = (piece: string) => {
        if (!piece) return;
        text += piece;
        onToken?.(piece);
      };
      let count = 0;
      let stopReason: GenerateResult['stopReason'];
      const t0 = performance.now();
      try {
        const result = await generator.generate(ids, {
          maxNewTokens: maxTokens,
          temperature: options.temperature ?? 0.7,
          ...(options.topP === undefined ? {} : { topP: options.topP }),
          ...(options.topK === undefined ? {} : { topK: options.topK }),
          seed: options.seed ?? 0,
          ...(signal ? { signal } : {}),
          onToken: (id) => {
            count++;
            emit(decoder.push(id));
          },
        });
        stopReason = result.stopReason;
      } catch (error) {
        if (!(error instanceof GenerationCancelled)) throw error;
        stopReason = 'aborted';
      } finally {
        generator.dispose();
      }
      emit(decoder.flush());
      const seconds = (performance.now() - t0) / 1000;
      return { text, tokens: count, stopReason, tokensPerSecond: seconds > 0 ? count / seconds : 0 };
    } finally {
      this.end(operation);
      release(onToken);
    }
  }

  // ---- the adapter library ------------------------------------------------------------------

  listAdapters(): Promise<AdapterEntry[]> {
    return this.store().listAdapters();
  }

  getAdapter(name: string): Promise<AdapterEntry | undefined> {
    return this.store().getAdapter(name);
  }

  async renameAdapter(from: string, to: string): Promise<AdapterEntry> {
    const entry = await this.store().renameAdapter(from, to);
    const resident = this.residents.get(from);
    if (resident) {
      this.residents.delete(from);
      this.residents.set(to, resident);
    }
    return entry;
  }

  async deleteAdapter(name: string): Promise<void> {
    await this.store().deleteAdapter(name);
    this.residents.get(name)?.dispose();
    this.residents.delete(name);
  }

  /** The adapter's two PEFT files, exactly as PEFT loads them. */
  async exportAdapter(name: string): Promise<{ config: string; weights: Uint8Array }> {
    const files = await this.store().readAdapterFiles(name);
    if (!files) throw new AdapterNotFoundError(name);
    // Moved to the calling thread, not copied (a fresh buffer from storage).
    return transfer({ config: files.config, weights: files.weights }, [files.weights.buffer as ArrayBuffer]);
  }

  /** The PEFT folder as a zip (adapter_config.json, adapter_model.safetensors, README.md). */
  async exportZip(name: string): Promise<Uint8Array> {
    const entry = await this.store().getAdapter(name);
    const files = await this.store().readAdapterFiles(name);
    if (!entry || !files) throw new AdapterNotFoundError(name);
    const zip = zipSync(
      {
        [ADAPTER_CONFIG_FILE]: strToU8(files.config),
        [ADAPTER_WEIGHTS_FILE]: [files.weights, { level: 0 }],
        'README.md': strToU8(adapterReadme(entry)),
      },
      { level: 6 },
    );
    return transfer(zip, [zip.buffer as ArrayBuffer]);
  }

  /**
   * A zip that continues this adapter's training on a cluster with TRL + PEFT (job/): the adapter,
   * the examples of the loaded dataset (the one it was trained on, when it was trained here), the
   * run's settings as job.json, and train.py. Needs the base model loaded.
   */
  async exportJob(name: string): Promise<Uint8Array> {
    const { model, info } = await this.requireModel('exportJob');
    const dataset = this.requireDataset('exportJob');
    const entry = await this.store().getAdapter(name);
    const files = await this.store().readAdapterFiles(name);
    if (!entry || !files) throw new AdapterNotFoundError(name);
    this.checkAdapterBase(entry, info);
    if (entry.datasetFingerprint !== undefined && entry.datasetFingerprint !== dataset.stats.fingerprint)
      throw new RunMismatchError(
        name,
        'dataset',
        `the job carries the data the adapter was trained on; load that file again (with the same sequence length, split and seed) before exporting the job`,
      );
    const resolved = resolveLoraTargets(entry.config, namedModules(model.config), model.config.modelType);
    // An imported adapter has no run of its own: the job gets the defaults on the loaded data.
    const training =
      (entry.training as unknown as RunConfig | undefined) ??
      resolveRunConfig(
        { name, from: name },
        {
          stats: dataset.stats,
          datasetSeq: dataset.stats.seq,
          longestExample: dataset.longest,
          maxPositions: info.maxPositions,
          fromConfig: entry.config,
        },
      );
    const zip = buildTrainingJob({
      name,
      adapter: files,
      resolved,
      baseModel: { id: entry.baseModel ?? info.id, modelType: info.modelType, architecture: info.architecture },
      training,
      data: { train: dataset.train, validation: dataset.validation },
      stepsTrained: entry.steps,
    });
    return transfer(zip, [zip.buffer]);
  }

  /**
   * Adds a PEFT adapter to the library: its two files (from a folder, a drop, or webtune's own
   * export), or a zip holding them. Checked against the loaded model when there is one.
   */
  async importAdapter(
    files: readonly { readonly name: string; readonly data: Blob | Uint8Array }[],
    name?: string,
  ): Promise<AdapterEntry> {
    const bytes = new Map<string, Uint8Array>();
    for (const f of files) {
      const data = f.data instanceof Uint8Array ? f.data : new Uint8Array(await f.data.arrayBuffer());
      const base = f.name.split('/').pop() as string;
      if (base.toLowerCase().endsWith('.zip')) {
        for (const [inner, content] of Object.entries(unzipSync(data)))
          bytes.set(inner.split('/').pop() as string, content);
      } else bytes.set(base, data);
    }
    const configBytes = bytes.get(ADAPTER_CONFIG_FILE);
    const weights = bytes.get(ADAPTER_WEIGHTS_FILE);
    if (!configBytes || !weights)
      throw new WebtuneError(
        `import: a PEFT adapter needs ${ADAPTER_CONFIG_FILE} and ${ADAPTER_WEIGHTS_FILE}; got ${[...bytes.keys()].join(', ') || 'no files'}`,
      );
    const config = new TextDecoder().decode(configBytes);
    const parsed = parseAdapterConfig(config);
    let resolvedConfig = parsed.config;
    if (this.loaded) {
      const { model } = this.loaded;
      resolvedConfig = importPeftAdapter(
        { config, safetensors: weights },
        namedModules(model.config),
        model.config.modelType,
      ).resolved.config;
    }
    const entryName = checkName(
      name ??
        (parsed.baseModelNameOrPath ? `${parsed.baseModelNameOrPath.split('/').pop()}-adapter` : 'imported-adapter'),
      'adapter name',
    );
    const entry: AdapterEntry = {
      name: entryName,
      baseModel: parsed.baseModelNameOrPath,
      config: resolvedConfig,
      steps: 0,
      created: Date.now(),
      bytes: configBytes.byteLength + weights.byteLength,
      origin: 'imported',
    };
    await this.store().putAdapter(entry, { config, weights });
    return entry;
  }

  // ---- teardown -----------------------------------------------------------------------------

  /** GPU buffers alive on this engine's device (0 after dispose) and WebGPU errors no scope
   * caught since the last call: for leak checks and tests. */
  async diagnostics(): Promise<{ liveBuffers: number; liveBytes: number; gpuErrors: string[] }> {
    return {
      liveBuffers: this.ctx?.liveBufferCount ?? 0,
      liveBytes: this.ctx?.liveBytes ?? 0,
      gpuErrors: this.ctx?.takeUncapturedErrors().map((e) => e.message) ?? [],
    };
  }

  /** Stops runs (their checkpoints stay, for resumeTraining() in a later session), aborts
   * downloads and generations, and frees every GPU buffer and the device. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    for (const control of this.runs.values()) control.stop();
    for (const op of this.operations.values()) op.abort();
    // Runs end after their current step; give them that long to free their memory.
    for (let i = 0; i < 600 && this.runs.size > 0; i++) await new Promise((r) => setTimeout(r, 50));
    this.unloadModel();
    this.disposed = true;
    this.ctx?.destroy();
    this.ctx = undefined;
  }
}

function adapterReadme(entry: AdapterEntry): string {
  return [
    `# ${entry.name}`,
    '',
    `A LoRA adapter for ${entry.baseModel ?? 'its base model'}, trained with webtune (${entry.steps} steps${entry.trainLoss === undefined ? '' : `, final training loss ${entry.trainLoss.toFixed(4)}`}).`,
    '',
    '```python',
    'from peft import PeftModel',
    'from transformers import AutoModelForCausalLM',
    `model = AutoModelForCausalLM.from_pretrained(${JSON.stringify(entry.baseModel ?? '<base model>')})`,
    'model = PeftModel.from_pretrained(model, "path/to/this/folder")',
    '```',
    '',
  ].join('\n');
}
