/**
 * Train: live training and validation loss curves (uPlot), progress, tokens/s and time left;
 * pause, resume, cancel; and, after a reload, the interrupted runs offered for resuming.
 */
import type { TrainConfig, TrainingRun } from '@webtune/train';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import type { Studio } from '../studio.js';
import { duration, el, fill } from '../ui.js';
import { loadData } from './data.js';

export class TrainPlace {
  readonly root: HTMLElement;
  private readonly resumable = el('div', { id: 'resumable' });
  private readonly status = el('p', { id: 'train-status', 'aria-live': 'polite' });
  private readonly bar = el('progress', { id: 'train-progress', max: 1, value: 0, 'aria-label': 'Training progress' });
  private readonly numbers = el('dl', { class: 'facts', id: 'train-numbers' });
  private readonly controls = el('div', { class: 'row' });
  private readonly chartBox = el('div', { id: 'loss-chart', role: 'img', 'aria-label': 'Loss curves' });
  private chart: uPlot | undefined;
  private drawn = -1;

  constructor(private readonly studio: Studio) {
    this.root = el(
      'section',
      { id: 'place-train', class: 'place', 'aria-labelledby': 'train-title' },
      el('h2', { id: 'train-title', tabindex: -1 }, 'Training'),
      this.resumable,
      el('div', { class: 'card' }, this.status, this.bar, this.numbers, this.controls),
      el('div', { class: 'card' }, el('h3', {}, 'Loss'), this.chartBox),
    );
    this.refresh();
  }

  /** Starts a run of `config` and follows it. */
  async start(config: TrainConfig): Promise<void> {
    const { studio } = this;
    studio.clearError();
    const run = studio.trainer.train(config, { onProgress: (p) => studio.track(p) });
    studio.rememberData(run.name);
    await this.follow(run, 0);
  }

  async resume(name: string): Promise<void> {
    const { studio } = this;
    studio.clearError();
    try {
      const saved = studio.checkpoints.find((c) => c.name === name);
      const choice = studio.recalledData(name);
      if (choice?.example && studio.dataset?.fingerprint !== saved?.dataset.fingerprint) {
        if (!(await loadData(studio, choice))) return;
      }
      const run = await studio.trainer.resumeTraining(name, { onProgress: (p) => studio.track(p) });
      await this.follow(run, saved?.step ?? 0, saved?.losses, saved?.validationLosses);
    } catch (error) {
      studio.fail(error);
    }
  }

  private async follow(
    handle: TrainingRun,
    step: number,
    losses: readonly (readonly [number, number])[] = [],
    validation: readonly (readonly [number, number])[] = [],
  ): Promise<void> {
    const { studio } = this;
    studio.run = {
      name: handle.name,
      status: 'starting',
      handle,
      step,
      totalSteps: 0,
      losses: losses.map(([s, l]) => [s, l]),
      validation: validation.map(([s, l]) => [s, l]),
      tokensPerSecond: 0,
      etaSeconds: Number.NaN,
      lr: 0,
    };
    this.drawn = -1;
    studio.go('train');
    try {
      await handle.done;
    } catch (error) {
      studio.fail(error);
    } finally {
      await studio.refreshLibrary();
    }
  }

  private renderChart(): void {
    const run = this.studio.run;
    const points = run ? run.losses.length + run.validation.length : 0;
    if (!run || points === this.drawn) return;
    this.drawn = points;
    const steps = run.losses.map(([s]) => s);
    const valid = new Map(run.validation);
    const data: uPlot.AlignedData = [steps, run.losses.map(([, l]) => l), steps.map((s) => valid.get(s) ?? null)];
    const width = Math.max(300, this.chartBox.clientWidth || 640);
    if (!this.chart) {
      this.chart = new uPlot(
        {
          width,
          height: 260,
          scales: { x: { time: false } },
          axes: [{ label: 'step' }, { label: 'loss' }],
          series: [
            { label: 'step' },
            { label: 'training loss', stroke: '#2563eb', width: 2 },
            { label: 'validation loss', stroke: '#d97706', width: 2, spanGaps: true, points: { size: 6 } },
          ],
        },
        data,
        this.chartBox,
      );
    } else this.chart.setData(data);
    this.chartBox.dataset.points = String(run.losses.length);
    const losses = run.losses.map(([, l]) => l);
    this.chartBox.setAttribute(
      'aria-label',
      losses.length
        ? `Loss curves: training loss from ${losses[0]?.toFixed(3)} to ${losses.at(-1)?.toFixed(3)} over ${losses.length} steps`
        : 'Loss curves (no step yet)',
    );
  }

  refresh(): void {
    const { studio } = this;
    const active = studio.run && ['starting', 'running', 'paused'].includes(studio.run.status);
    const offers = studio.checkpoints.filter((c) => !(active && c.name === studio.run?.name));
    fill(
      this.resumable,
      ...offers.map((c) =>
        el(
          'div',
          { class: 'card offer', role: 'status' },
          el('p', {}, `“${c.name}” was interrupted at step ${c.step} of ${c.totalSteps}. `),
          el(
            'button',
            { type: 'button', class: 'primary', disabled: active, onclick: () => void this.resume(c.name) },
            `Resume ${c.name}`,
          ),
          ' ',
          el(
            'button',
            {
              type: 'button',
              class: 'quiet',
              disabled: active,
              onclick: async () => {
                await studio.trainer.discardCheckpoint(c.name);
                await studio.refreshLibrary();
              },
            },
            'Discard',
          ),
        ),
      ),
    );
    const run = studio.run;
    if (!run) {
      this.status.textContent = 'No run yet. Configure one and press Start.';
      fill(this.controls);
      fill(this.numbers);
      return;
    }
    const words: Record<typeof run.status, string> = {
      starting: 'Starting (compiling the GPU kernels)…',
      running: 'Training',
      paused: 'Paused (checkpoint saved)',
      completed: 'Done: the adapter is saved in your library',
      cancelled: 'Cancelled',
      stopped: 'Stopped; resume it later',
      failed: 'Failed',
    };
    this.status.textContent = `${run.name}: ${words[run.status]}${run.totalSteps ? ` — step ${run.step} of ${run.totalSteps}` : ''}`;
    this.root.dataset.status = run.status;
    this.bar.max = run.totalSteps || 1;
    this.bar.value = run.step;
    const last = run.losses.at(-1)?.[1];
    const val = run.validation.at(-1)?.[1];
    fill(
      this.numbers,
      el('dt', {}, 'Training loss'),
      el('dd', { id: 'train-loss' }, last === undefined ? '–' : last.toFixed(4)),
      el('dt', {}, 'Validation loss'),
      el('dd', {}, val === undefined ? '–' : val.toFixed(4)),
      el('dt', {}, 'Speed'),
      el('dd', {}, `${run.tokensPerSecond.toFixed(0)} tokens/s`),
      el('dt', {}, 'Time left'),
      el('dd', {}, run.status === 'running' ? duration(run.etaSeconds) : '–'),
    );
    const handle = run.handle;
    const live = run.status === 'running' || run.status === 'starting';
    fill(
      this.controls,
      live && handle
        ? el('button', { type: 'button', id: 'pause', onclick: () => void handle.pause() }, 'Pause')
        : null,
      run.status === 'paused' && handle
        ? el(
            'button',
            { type: 'button', id: 'resume', class: 'primary', onclick: () => void handle.resume() },
            'Resume',
          )
        : null,
      (live || run.status === 'paused') && handle
        ? el('button', { type: 'button', id: 'cancel', class: 'danger', onclick: () => void handle.cancel() }, 'Cancel')
        : null,
      run.status === 'completed'
        ? el(
            'button',
            { type: 'button', id: 'go-try', class: 'primary', onclick: () => studio.go('try') },
            'Next: try it',
          )
        : null,
    );
    if (studio.place === 'train') this.renderChart();
  }
}
