/**
 * What the trainer keeps between sessions: the adapter library and the checkpoints of runs in
 * progress. Two implementations of one interface: IndexedDB in browsers (indexeddb.ts, through
 * idb-keyval) and a folder under Node (directory.ts). Base-model weights never go here (they are
 * cached by the model loader, in the Cache API or a cache folder).
 *
 * Every write is atomic: a failed or interrupted save (quota, a closed tab, a killed process)
 * leaves the previous adapter or checkpoint as it was.
 */
import type { DataCursor } from '../data/index.js';
import type { LoraConfig } from '../lora/index.js';

/** One adapter of the library, as list() shows it. */
export interface AdapterEntry {
  readonly name: string;
  /** base_model_name_or_path: the Hub id, URL or folder of the model it was trained on. */
  readonly baseModel: string | null;
  /** modelFingerprint() of that model's weights; undefined for an imported adapter. */
  readonly baseFingerprint?: string;
  /** The LoRA configuration as adapter_config.json states it. */
  readonly config: LoraConfig;
  /** Optimizer steps it was trained for (0 for an imported adapter). */
  readonly steps: number;
  readonly trainLoss?: number;
  readonly validationLoss?: number;
  /** Milliseconds since the epoch. */
  readonly created: number;
  /** Bytes of its two PEFT files. */
  readonly bytes: number;
  readonly origin: 'trained' | 'imported';
  /** fingerprintExamples() of the data it was trained on, when trained here. */
  readonly datasetFingerprint?: string;
  /** The run's settings (run/config.ts RunConfig: optimizer, schedule, steps, batch, seq ...),
   * when trained here: what a cluster job continues with. */
  readonly training?: Readonly<Record<string, unknown>>;
}

/** The two files of a PEFT adapter folder, as PEFT writes them. */
export interface AdapterFiles {
  /** adapter_config.json */
  readonly config: string;
  /** adapter_model.safetensors */
  readonly weights: Uint8Array;
}

/** Everything a run needs to continue exactly where it stopped (run/checkpoint.ts builds it). */
export interface CheckpointMeta {
  readonly version: 1;
  /** The run's name: the adapter's name in the library once it completes. */
  readonly name: string;
  /** Optimizer steps taken; the next step is step + 1. */
  readonly step: number;
  readonly totalSteps: number;
  /** Where the data loader resumes (epoch, position in the seeded order). */
  readonly cursor: DataCursor;
  /** The run's configuration, fully resolved (see run/config.ts). */
  readonly config: Readonly<Record<string, unknown>>;
  readonly baseModel: { readonly id: string | null; readonly fingerprint: string };
  readonly dataset: { readonly fingerprint: string; readonly examples: number; readonly validation: number };
  /** Adapted module names, in the order of the tensors. */
  readonly modules: readonly string[];
  /** [step, loss] of every step so far, and [step, validation loss] of every evaluation. */
  readonly losses: readonly (readonly [number, number])[];
  readonly validationLosses: readonly (readonly [number, number])[];
  /** Tokens trained on and seconds spent so far (for throughput and ETA after a resume). */
  readonly tokens: number;
  readonly seconds: number;
  readonly created: number;
  readonly updated: number;
  /** With f16 tile math: the loss scale for the next step and the good steps counted towards its
   * growth (TrainerState.lossScale). Absent in checkpoints of f32 runs and of earlier versions. */
  readonly lossScale?: { readonly scale: number; readonly goodSteps: number };
}

export interface CheckpointRecord {
  readonly meta: CheckpointMeta;
  /** Per module: `<module>.lora_A`, `.lora_B`, `.exp_avg.lora_A`, ... (run/checkpoint.ts). */
  readonly tensors: Readonly<Record<string, Float32Array>>;
}

export interface TrainerStorage {
  /** Where it keeps things, for messages ("IndexedDB webtune", a folder path). */
  readonly description: string;
  listAdapters(): Promise<AdapterEntry[]>;
  getAdapter(name: string): Promise<AdapterEntry | undefined>;
  readAdapterFiles(name: string): Promise<AdapterFiles | undefined>;
  /** Saves an adapter atomically; AdapterExistsError when the name is taken and !overwrite. */
  putAdapter(entry: AdapterEntry, files: AdapterFiles, options?: { overwrite?: boolean }): Promise<void>;
  /** AdapterNotFoundError / AdapterExistsError; the adapter is never lost or duplicated. */
  renameAdapter(from: string, to: string): Promise<AdapterEntry>;
  deleteAdapter(name: string): Promise<void>;
  listCheckpoints(): Promise<CheckpointMeta[]>;
  readCheckpoint(name: string): Promise<CheckpointRecord | undefined>;
  /** Replaces the run's checkpoint atomically. */
  putCheckpoint(record: CheckpointRecord): Promise<void>;
  deleteCheckpoint(name: string): Promise<void>;
}
