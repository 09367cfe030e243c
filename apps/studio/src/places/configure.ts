/**
 * Configure: the LoRA and training settings with sensible defaults (a first-time user just
 * presses Start), and a live memory estimate against this GPU's limits, from the trainer's own
 * planner, with a warning before a setting that cannot fit.
 */
import type { TrainConfig, TrainingPlan } from '@webtune/train';
import type { Studio } from '../studio.js';
import { bytes, count, el, field, fill } from '../ui.js';

function number(id: string, value: number, attrs: Record<string, number> = {}): HTMLInputElement {
  return el('input', { id, type: 'number', value, ...attrs });
}

export class ConfigurePlace {
  readonly root: HTMLElement;
  private readonly name = el('input', { id: 'cfg-name', type: 'text', autocomplete: 'off' });
  private readonly rank = number('cfg-rank', 8, { min: 1, max: 256 });
  private readonly alpha = number('cfg-alpha', 16, { min: 1, max: 1024 });
  private readonly dropout = el('input', { id: 'cfg-dropout', type: 'number', value: 0, step: 0.05, min: 0, max: 0.9 });
  private readonly lr = el('input', { id: 'cfg-lr', type: 'number', value: 0.005, step: 'any', min: 0 });
  private readonly schedule = el(
    'select',
    { id: 'cfg-schedule' },
    el('option', { value: 'cosine' }, 'cosine'),
    el('option', { value: 'linear' }, 'linear'),
    el('option', { value: 'constant' }, 'constant'),
  );
  private readonly warmup = number('cfg-warmup', 2, { min: 0 });
  private readonly steps = number('cfg-steps', 20, { min: 1 });
  private readonly unit = el(
    'select',
    { id: 'cfg-unit' },
    el('option', { value: 'steps' }, 'steps'),
    el('option', { value: 'epochs' }, 'passes over the data (epochs)'),
  );
  private readonly seq = number('cfg-seq', 128, { min: 8, max: 32768, step: 8 });
  private readonly batch = number('cfg-batch', 4, { min: 1, max: 256 });
  private readonly accum = number('cfg-accum', 1, { min: 1, max: 256 });
  private readonly recompute = el('input', { id: 'cfg-recompute', type: 'checkbox' });
  private readonly checkpointEvery = number('cfg-checkpoint', 5, { min: 0 });
  private readonly targets = el('fieldset', { id: 'cfg-targets', class: 'targets' });
  private readonly estimate = el('div', { id: 'cfg-estimate', class: 'card', 'aria-live': 'polite' });
  private readonly from = el('p', { id: 'cfg-from' });
  private plan: TrainingPlan | undefined;
  private planTimer: ReturnType<typeof setTimeout> | undefined;
  private targetsFor: string | undefined;
  private seqFor: string | undefined;
  onStart: (config: TrainConfig) => void = () => undefined;

  constructor(private readonly studio: Studio) {
    const form = el(
      'form',
      {
        id: 'cfg-form',
        onsubmit: (e: Event) => {
          e.preventDefault();
          this.onStart(this.config());
        },
        oninput: () => this.replan(),
        onchange: () => this.replan(),
      },
      el(
        'div',
        { class: 'grid' },
        field('Adapter name', this.name, 'its name in your library'),
        field('Rank r', this.rank, 'LoRA rank: capacity of the adapter'),
        field('Alpha', this.alpha, 'scale = alpha / r'),
        field('LoRA dropout', this.dropout, 'share of the adapter’s inputs dropped while training (0 = none)'),
        field('Learning rate', this.lr),
        field('Schedule', this.schedule),
        field('Warmup steps', this.warmup),
        field('Train for', this.steps),
        field('Counted in', this.unit),
        field('Sequence length (tokens)', this.seq, 'at least the data’s longest example'),
        field('Batch size', this.batch),
        field('Gradient accumulation', this.accum),
        field('Checkpoint every (steps)', this.checkpointEvery),
        field('Recompute activations (less memory, slower)', this.recompute),
      ),
      this.targets,
      this.from,
      this.estimate,
      el('button', { type: 'submit', id: 'start-training', class: 'primary big' }, 'Start training'),
    );
    this.root = el(
      'section',
      { id: 'place-configure', class: 'place', 'aria-labelledby': 'configure-title' },
      el('h2', { id: 'configure-title', tabindex: -1 }, 'Configure the adapter'),
      el(
        'p',
        { class: 'lead' },
        'The defaults train a small adapter quickly. Change what you like; the memory estimate follows.',
      ),
      form,
    );
    this.refresh();
  }

  /** The run the form describes. */
  config(): TrainConfig {
    const checked = [...this.targets.querySelectorAll<HTMLInputElement>('input:checked')].map((i) => i.value);
    const from = this.studio.continueFrom;
    return {
      ...(this.name.value.trim() ? { name: this.name.value.trim() } : {}),
      ...(from
        ? { from }
        : {
            lora: {
              rank: Number(this.rank.value),
              alpha: Number(this.alpha.value),
              ...(Number(this.dropout.value) > 0 ? { dropout: Number(this.dropout.value) } : {}),
              ...(checked.length ? { targets: checked } : {}),
            },
          }),
      optimizer: { lr: Number(this.lr.value) },
      schedule: {
        kind: this.schedule.value as 'cosine' | 'linear' | 'constant',
        warmupSteps: Number(this.warmup.value),
      },
      ...(this.unit.value === 'epochs' ? { epochs: Number(this.steps.value) } : { steps: Number(this.steps.value) }),
      seq: Number(this.seq.value),
      batch: Number(this.batch.value),
      gradAccum: Number(this.accum.value),
      recompute: this.recompute.checked,
      checkpointEvery: Number(this.checkpointEvery.value),
      evalEvery: 5,
    };
  }

  private replan(): void {
    if (this.planTimer) clearTimeout(this.planTimer);
    this.planTimer = setTimeout(() => void this.updatePlan(), 250);
  }

  private async updatePlan(): Promise<void> {
    if (!this.studio.model || !this.studio.dataset) return;
    try {
      this.plan = await this.studio.trainer.plan(this.config());
      this.renderEstimate(undefined);
    } catch (error) {
      this.plan = undefined;
      this.renderEstimate(error instanceof Error ? error.message : String(error));
    }
  }

  private renderEstimate(problem: string | undefined): void {
    const p = this.plan;
    if (!p) {
      fill(this.estimate, el('p', { class: 'warn' }, problem ?? 'Load a model and data to see the memory estimate.'));
      return;
    }
    const m = p.memory;
    const device = this.studio.model?.device;
    fill(
      this.estimate,
      el('h3', {}, 'GPU memory for this setting'),
      el(
        'dl',
        { class: 'facts' },
        el('dt', {}, 'Total'),
        el('dd', { id: 'cfg-total' }, bytes(m.total)),
        el('dt', {}, 'Model weights'),
        el('dd', {}, bytes(m.frozenWeights)),
        el('dt', {}, 'Adapter and optimizer'),
        el(
          'dd',
          {},
          `${bytes(m.trainable)} (${count(p.trainableParameters)} trainable parameters in ${p.adaptedModules} modules)`,
        ),
        el('dt', {}, 'Activations'),
        el('dd', {}, bytes(m.activations)),
        el('dt', {}, 'Largest buffer'),
        el(
          'dd',
          {},
          `${bytes(m.largestBuffer.bytes)}${device ? ` of ${bytes(device.maxStorageBufferBindingSize)} allowed` : ''}`,
        ),
        el('dt', {}, 'Run'),
        el(
          'dd',
          {},
          `${p.totalSteps} steps, ${p.epochs.toFixed(2)} passes over the data, ${p.tokensPerStep} tokens per step`,
        ),
      ),
      p.fits
        ? el('p', { class: 'ok' }, 'Fits this GPU.')
        : el(
            'p',
            { class: 'warn', role: 'alert' },
            `Will not fit: ${p.problem}. Lower the batch, the sequence length or the rank, turn on recomputation, ` +
              'or load the model with 8- or 4-bit weights (Model).',
          ),
    );
  }

  refresh(): void {
    const m = this.studio.model;
    if (m && this.targetsFor !== m.fingerprint) {
      this.targetsFor = m.fingerprint;
      fill(
        this.targets,
        el('legend', {}, 'Target modules'),
        ...m.modules.map((name) =>
          el(
            'label',
            { class: 'check' },
            el('input', { type: 'checkbox', value: name, checked: m.defaultTargets.includes(name) }),
            ` ${name}`,
          ),
        ),
      );
    }
    const data = this.studio.dataset;
    if (data && this.seqFor !== data.fingerprint) {
      this.seqFor = data.fingerprint;
      this.seq.value = String(data.seq);
    }
    const from = this.studio.continueFrom;
    fill(
      this.from,
      from
        ? el(
            'span',
            {},
            `Continues training “${from}” (its rank and targets). `,
            el(
              'button',
              {
                type: 'button',
                class: 'quiet',
                onclick: () => {
                  this.studio.continueFrom = undefined;
                  this.studio.changed();
                },
              },
              'Start a new adapter instead',
            ),
          )
        : '',
    );
    this.rank.disabled = from !== undefined;
    this.alpha.disabled = from !== undefined;
    this.dropout.disabled = from !== undefined;
    this.replan();
  }
}
