/**
 * The studio's shared state and the one trainer (in a Web Worker: all GPU and tokenizer work
 * happens there, the page only draws). Places read the state and call the trainer through here,
 * and re-render when `changed()` is announced.
 */
import type {
  AdapterEntry,
  CheckpointMeta,
  DatasetStats,
  DeviceInfo,
  ExamplePreview,
  LoadDatasetOptions,
  ModelInfo,
  Trainer,
  TrainerProgress,
  TrainingRun,
} from '@webtune/train';
import { explain } from './explain.js';
import { byId, el, fill } from './ui.js';

export type Place = 'model' | 'data' | 'configure' | 'train' | 'try';
export const PLACES: { id: Place; title: string }[] = [
  { id: 'model', title: 'Model' },
  { id: 'data', title: 'Data' },
  { id: 'configure', title: 'Configure' },
  { id: 'train', title: 'Train' },
  { id: 'try', title: 'Try & keep' },
];

export const BUNDLED_MODEL = { id: 'stories260K', url: '/models/stories260K/' };
export const EXAMPLE_DATA = { name: 'example-stories.jsonl', url: '/data/example-stories.jsonl' };

/** How a dataset was loaded, so an interrupted run can load it again (kept in localStorage). */
export interface DataChoice {
  readonly file: string;
  readonly example: boolean;
  readonly options: Omit<LoadDatasetOptions, 'onProgress' | 'signal'>;
}

export interface RunView {
  name: string;
  status: 'starting' | 'running' | 'paused' | 'completed' | 'cancelled' | 'stopped' | 'failed';
  handle?: TrainingRun;
  step: number;
  totalSteps: number;
  losses: [number, number][];
  validation: [number, number][];
  tokensPerSecond: number;
  etaSeconds: number;
  lr: number;
}

export class Studio {
  place: Place = 'model';
  device: DeviceInfo | undefined;
  model: ModelInfo | undefined;
  /** A model load in progress: which file, how far. */
  loading: { label: string; loaded: number; total: number } | undefined;
  dataset: DatasetStats | undefined;
  dataChoice: DataChoice | undefined;
  preview: ExamplePreview[] = [];
  run: RunView | undefined;
  adapters: AdapterEntry[] = [];
  checkpoints: CheckpointMeta[] = [];
  /** Set by Try & keep's "continue training". */
  continueFrom: string | undefined;
  private readonly listeners = new Set<() => void>();

  constructor(readonly trainer: Trainer) {}

  onChange(listener: () => void): void {
    this.listeners.add(listener);
  }

  changed(): void {
    for (const l of this.listeners) l();
  }

  go(place: Place): void {
    this.place = place;
    this.changed();
    document.getElementById(`place-${place}`)?.querySelector<HTMLElement>('h2')?.focus();
  }

  /** Shows an error in plain words in the banner (and logs it). */
  fail(error: unknown): void {
    console.error(error);
    const { title, detail } = explain(error);
    const banner = byId('error');
    fill(
      banner,
      el('strong', {}, title),
      el('p', {}, detail),
      el('button', { type: 'button', class: 'quiet', onclick: () => fill(banner) }, 'Dismiss'),
    );
    banner.focus();
  }

  clearError(): void {
    fill(byId('error'));
  }

  async refreshLibrary(): Promise<void> {
    [this.adapters, this.checkpoints] = await Promise.all([
      this.trainer.adapters.list(),
      this.trainer.listCheckpoints(),
    ]);
    this.changed();
  }

  /** Remembers how the data of a run was loaded. */
  rememberData(run: string): void {
    if (this.dataChoice) localStorage.setItem(`webtune.run.${run}`, JSON.stringify(this.dataChoice));
  }

  recalledData(run: string): DataChoice | undefined {
    const text = localStorage.getItem(`webtune.run.${run}`);
    return text ? (JSON.parse(text) as DataChoice) : undefined;
  }

  /** Updates the run view from a progress event. */
  track(p: TrainerProgress): void {
    const run = this.run;
    if (!run) return;
    switch (p.type) {
      case 'step':
        run.status = 'running';
        run.step = p.step;
        run.totalSteps = p.totalSteps;
        run.losses.push([p.step, p.loss]);
        run.tokensPerSecond = p.tokensPerSecond;
        run.etaSeconds = p.etaSeconds;
        run.lr = p.lr;
        break;
      case 'eval':
        run.validation.push([p.step, p.validationLoss]);
        break;
      case 'paused':
        run.status = 'paused';
        break;
      case 'resumed':
        run.status = 'running';
        break;
      case 'done':
        run.status = p.result.status;
        break;
      case 'error':
        run.status = 'failed';
        break;
      default:
        break;
    }
    this.changed();
  }
}
