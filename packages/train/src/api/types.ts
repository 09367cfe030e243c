/**
 * The public API's types: what createTrainer() gives a web app, the same in a Web Worker and in
 * the calling thread. Everything here is plain data (structured-cloneable), so it crosses the
 * worker boundary unchanged; callbacks are the only functions.
 */
import type { ChatMessage, LoadProgress, WeightPrecision } from '@webtune/models';
import type { ChatOptions, DatasetColumns } from '../data/index.js';
import type { MemoryEstimate } from '../memory.js';
import type { AdapterEntry, CheckpointMeta } from '../store/types.js';

export type { AdapterEntry, CheckpointMeta };

// ---------------------------------------------------------------------------------------------
// Creating a trainer

export interface CreateTrainerOptions {
  /**
   * Where the engine runs: `true` (default in browsers) a module Worker shipped with the package,
   * `false` this thread, or a Worker you created that runs `@webtune/train/worker`. The interface
   * is the same either way.
   */
  worker?: boolean | Worker;
  /** Where adapters and checkpoints are kept. Default: IndexedDB database "webtune" in browsers;
   * under Node a folder ($WEBTUNE_HOME, else ~/.cache/webtune/library). */
  storage?: StorageOptions;
  /** Asked of navigator.gpu (or Dawn under Node). */
  gpu?: {
    powerPreference?: GPUPowerPreference;
    featureLevel?: 'core' | 'compatibility';
    /** Kernel configurations: 'auto' (default: from the adapter's info, or measured once when it
     * names nothing), or 'gpu' / 'cpu' to skip the measurement. */
    kernelProfile?: 'auto' | 'gpu' | 'cpu';
    /** How the tiled matmuls read their operands: 'auto' (default: staged on GPUs; on a CPU driver
     * from its name, or measured once when it names nothing), or 'workgroup' / 'direct'. */
    matmulStaging?: 'auto' | 'workgroup' | 'direct';
  };
}

export type StorageOptions = { readonly indexedDb: string } | { readonly directory: string };

// ---------------------------------------------------------------------------------------------
// Models

/**
 * A model to load: a Hugging Face Hub repo id ("HuggingFaceTB/SmolLM2-135M-Instruct"), a URL of
 * a model folder ("/models/stories260K/", "https://..."), the files of a model folder (File[] or a
 * FileList from a picker or a drop), a FileSystemDirectoryHandle, or under Node a folder path.
 */
export type ModelInput =
  | string
  | URL
  | readonly File[]
  | FileList
  | FileSystemDirectoryHandle
  | { readonly hub: string; readonly revision?: string }
  | { readonly url: string }
  | { readonly directory: string };

export interface LoadModelOptions {
  /** What adapters record as base_model_name_or_path (default: the Hub id, URL or folder). */
  id?: string;
  /** Frozen weights on the GPU: 'f16' (default), 'f32', or llama.cpp's block formats 'q8_0' and
   * 'q4_0' for the linear layers (QLoRA; the embedding and LM head stay f16). */
  precision?: WeightPrecision;
  /** Hub revision (branch, tag or commit). Default "main". */
  revision?: string;
  /** Hub endpoint (a mirror). Default https://huggingface.co. */
  endpoint?: string;
  /** Keep downloaded files for offline use (Cache API in browsers, a folder under Node). Default true. */
  cache?: boolean;
  onProgress?: (progress: TrainerProgress) => void;
  signal?: AbortSignal;
}

export interface ModelInfo {
  /** The Hub id, URL or folder name: what adapters record as base_model_name_or_path. */
  readonly id: string;
  /** config.json's architectures[0] ("LlamaForCausalLM"). */
  readonly architecture: string;
  readonly modelType: string;
  readonly parameters: number;
  readonly layers: number;
  readonly hiddenSize: number;
  readonly vocabSize: number;
  readonly maxPositions: number;
  /** Names of the linear modules LoRA can target, as PEFT matches them (suffixes: q_proj, ...). */
  readonly modules: readonly string[];
  /** PEFT's default target_modules for this model type. */
  readonly defaultTargets: readonly string[];
  /** GPU bytes of the frozen weights. */
  readonly bytes: number;
  readonly precision: WeightPrecision;
  /** Identifies the weights (checked when resuming a run or using an adapter). */
  readonly fingerprint: string;
  readonly hasChatTemplate: boolean;
  /** The GPU it runs on and the limits that bound a plan. */
  readonly device: DeviceInfo;
}

export interface DeviceInfo {
  readonly description: string;
  readonly software: boolean;
  readonly maxBufferSize: number;
  readonly maxStorageBufferBindingSize: number;
  readonly features: readonly string[];
}

// ---------------------------------------------------------------------------------------------
// Data

/** Data to train on: a File or Blob (read as a stream), a string (the content itself), or under
 * Node `{ path }`. */
export type DatasetInput = Blob | string | { readonly path: string };

export interface LoadDatasetOptions {
  /** Names the data in messages and picks the format ('auto'); default: File.name. */
  file?: string;
  /** Tokens per example (the training sequence length). Default 256, at most the model's context. */
  seq?: number;
  format?: 'auto' | 'text' | 'jsonl' | 'json' | 'csv' | 'tsv';
  /** Join examples trained on every token end to end into full windows (plain text, {"text"}). */
  pack?: boolean;
  /** CSV/TSV: the text column, the prompt and completion columns, or Alpaca's instruction, input
   * and output (default: found by those names in the header). */
  columns?: DatasetColumns;
  chat?: ChatOptions;
  /** Skip (and count) malformed lines instead of stopping at the first. Default false. */
  skipBadLines?: boolean;
  /** Fraction of the records held out for validation (seeded). Default 0. */
  validation?: number;
  /** Seeds the validation split. Default 0. */
  seed?: number;
  onProgress?: (progress: TrainerProgress) => void;
  signal?: AbortSignal;
}

export interface DatasetStats {
  readonly file: string;
  readonly format: string;
  readonly seq: number;
  /** Training examples (after the split). */
  readonly examples: number;
  readonly tokens: number;
  /** Tokens that take loss. */
  readonly trainedTokens: number;
  readonly truncated: number;
  readonly dropped: number;
  readonly badLines: number;
  /** Examples held out for validation. */
  readonly validation: number;
  readonly fingerprint: string;
  /** Records read (lines, rows, or windows of plain text). */
  readonly records: number;
  readonly validationTokens: number;
  /** The first malformed lines skipped (skipBadLines), with what was wrong. */
  readonly skippedLines: readonly { readonly line: number; readonly reason: string }[];
}

/** One tokenized example for a preview: each token's text and whether it takes loss. */
export interface ExamplePreview {
  readonly index: number;
  readonly line?: number;
  readonly tokens: readonly { readonly id: number; readonly text: string; readonly trained: boolean }[];
  readonly truncated: boolean;
}

// ---------------------------------------------------------------------------------------------
// Training

export interface TrainConfig {
  /** The adapter's name in the library (and the run's, for resuming). Default: a timestamp. */
  name?: string;
  /** Replace an adapter of the same name when the run completes. Default false (an error up front). */
  overwrite?: boolean;
  lora?: {
    rank?: number;
    /** Default: 2 × rank. */
    alpha?: number;
    /** Module names (suffixes such as "q_proj"), "all-linear", or a regex; default PEFT's for the model. */
    targets?: readonly string[] | string;
    rsLoRA?: boolean;
    dropout?: number;
    /** Any other PEFT LoraConfig field (rank_pattern, layers_to_transform, init_lora_weights ...). */
    peft?: Readonly<Record<string, unknown>>;
  };
  optimizer?: {
    /** Peak learning rate. Default 2e-4. */
    lr?: number;
    beta1?: number;
    beta2?: number;
    eps?: number;
    /** Default 0.01. */
    weightDecay?: number;
    /** Global gradient-norm clipping; default 1; null = none. */
    maxGradNorm?: number | null;
  };
  schedule?: { kind?: 'constant' | 'linear' | 'cosine'; warmupSteps?: number };
  /** Optimizer steps; or `epochs` over the training examples (default 1 epoch). */
  steps?: number;
  epochs?: number;
  /** Sequences per micro-batch. Default 4. */
  batch?: number;
  /** Tokens per sequence; default: the dataset's. */
  seq?: number;
  /** Micro-batches per optimizer step. Default 1. */
  gradAccum?: number;
  /** Seeds the adapter's initialisation and the data order. Default 0. */
  seed?: number;
  /** Save a checkpoint every this many steps (and on pause). Default 25; 0 = only on pause. */
  checkpointEvery?: number;
  /** Validation loss every this many steps (and at the end) when the data has a validation split.
   * Default: checkpointEvery. */
  evalEvery?: number;
  /** Recompute activations in the backward: less memory, about a third more time. */
  recompute?: boolean;
  /** How the projections and attention stage and multiply their tiles: 'f16' (needs shader-f16;
   * the backward's products too, under dynamic loss scaling) or 'f32'. Default: f16 on GPUs with
   * shader-f16 (f32 for a model loaded with f32 weights), else f32 (trainingTileMath). */
  tileMath?: 'f16' | 'f32';
  /** Continue training a saved adapter: its weights and LoRA configuration are the start. */
  from?: string;
}

export interface TrainOptions {
  onProgress?: (progress: TrainerProgress) => void;
  /** When another tab (or trainer) is training on this GPU: wait for it, or fail at once with
   * TrainerBusyError. Default 'error'. */
  whenBusy?: 'wait' | 'error';
}

export interface TrainResult {
  readonly name: string;
  /** 'stopped': the trainer was disposed mid-run; its checkpoint is kept for resumeTraining(). */
  readonly status: 'completed' | 'cancelled' | 'stopped';
  /** Optimizer steps taken. */
  readonly steps: number;
  readonly totalSteps: number;
  /** Loss of the last step. */
  readonly trainLoss: number | undefined;
  /** The last validation loss, when the data has a validation split. */
  readonly validationLoss: number | undefined;
  /** The saved adapter (completed runs). */
  readonly adapter: AdapterEntry | undefined;
  readonly tokens: number;
  readonly seconds: number;
}

/** The handle of a training run: the same from train() and resumeTraining(). */
export interface TrainingRun {
  readonly name: string;
  /** Resolves when the run completes, is cancelled or is stopped by dispose(); rejects when it
   * fails (divergence, no memory ...). */
  readonly done: Promise<TrainResult>;
  /** Stops after the current step and saves a checkpoint; resolves once paused. */
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Stops after the current step, frees the GPU memory and discards the checkpoint. */
  cancel(): Promise<void>;
}

/** What a configuration will cost, before it runs. */
export interface TrainingPlan {
  readonly totalSteps: number;
  readonly epochs: number;
  readonly tokensPerStep: number;
  readonly memory: MemoryEstimate;
  /** Whether it fits the device's buffer limits (and the memory budget); why not, if it does not. */
  readonly fits: boolean;
  readonly problem?: string;
  readonly trainableParameters: number;
  readonly adaptedModules: number;
}

// ---------------------------------------------------------------------------------------------
// Progress: one union, tagged by `type`, for every long operation.

export type TrainerProgress =
  | { readonly type: 'download'; readonly file: string; readonly loaded: number; readonly total: number }
  | { readonly type: 'weights'; readonly loaded: number; readonly total: number; readonly tensor?: string }
  | { readonly type: 'tokenize'; readonly done: number; readonly total: number }
  | {
      readonly type: 'step';
      readonly step: number;
      readonly totalSteps: number;
      readonly loss: number;
      readonly lr: number;
      readonly gradNorm: number;
      readonly tokensPerSecond: number;
      readonly etaSeconds: number;
      readonly epoch: number;
      /** With f16 tile math: the loss scale the step's gradients carried. */
      readonly lossScale?: number;
      /** With f16 tile math: the gradients overflowed at that scale, so the update was skipped
       * (nothing changed) and the scale lowered (halved by default). */
      readonly overflow?: boolean;
    }
  | { readonly type: 'eval'; readonly step: number; readonly validationLoss: number }
  | { readonly type: 'checkpoint'; readonly step: number }
  | { readonly type: 'paused'; readonly step: number }
  | { readonly type: 'resumed'; readonly step: number }
  | { readonly type: 'recovered'; readonly step: number; readonly reason: string }
  | { readonly type: 'done'; readonly result: TrainResult }
  | { readonly type: 'error'; readonly message: string; readonly name: string };

/** Converts the model loader's own progress into the union. */
export function weightsProgress(p: LoadProgress): TrainerProgress {
  return { type: 'weights', loaded: p.loaded, total: p.total, ...(p.tensor === undefined ? {} : { tensor: p.tensor }) };
}

// ---------------------------------------------------------------------------------------------
// Generation

export interface GenerateOptions {
  /** A library adapter's name, or null (default) for the base model. */
  adapter?: string | null;
  /** Default 128. */
  maxTokens?: number;
  /** 0 = greedy. Default 0.7. */
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number;
  /** Render the prompt with the model's chat template as a user message. Default: true when the
   * model has a chat template and the prompt is a string. */
  chat?: boolean;
  /** Called with each new piece of text as it is decoded. */
  onToken?: (text: string) => void;
  signal?: AbortSignal;
}

export interface GenerateResult {
  readonly text: string;
  readonly tokens: number;
  readonly stopReason: 'stop-token' | 'max-new-tokens' | 'context-full' | 'aborted';
  readonly tokensPerSecond: number;
}

export type Prompt = string | readonly ChatMessage[];
