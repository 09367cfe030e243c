/**
 * Try & keep: one prompt, the base model's and an adapter's completions streamed side by side;
 * the adapter library (rename, delete, download the PEFT files or a zip, import a PEFT adapter,
 * continue training, download the cluster job).
 */
import type { AdapterEntry } from '@webtune/train';
import type { Studio } from '../studio.js';
import { bytes, download, el, field, fill } from '../ui.js';

export class TryPlace {
  readonly root: HTMLElement;
  private readonly prompt = el('textarea', { id: 'try-prompt', rows: 3 }, 'Once upon a time');
  private readonly tokens = el('input', { id: 'try-tokens', type: 'number', value: 48, min: 1, max: 1024 });
  private readonly temperature = el('input', {
    id: 'try-temperature',
    type: 'number',
    value: 0,
    min: 0,
    max: 2,
    step: 0.1,
  });
  private readonly adapter = el('select', { id: 'try-adapter' });
  private readonly base = el('pre', { id: 'out-base', class: 'out', 'aria-live': 'polite' });
  private readonly tuned = el('pre', { id: 'out-adapter', class: 'out', 'aria-live': 'polite' });
  private readonly library = el('div', { id: 'library' });
  private generating: AbortController | undefined;

  constructor(private readonly studio: Studio) {
    const importer = el('input', {
      id: 'import-adapter',
      type: 'file',
      multiple: true,
      accept: '.json,.safetensors,.zip',
    });
    importer.addEventListener('change', async () => {
      const files = importer.files;
      if (!files?.length) return;
      try {
        await studio.trainer.adapters.import(files);
        await studio.refreshLibrary();
      } catch (error) {
        studio.fail(error);
      } finally {
        importer.value = '';
      }
    });
    this.root = el(
      'section',
      { id: 'place-try', class: 'place', 'aria-labelledby': 'try-title' },
      el('h2', { id: 'try-title', tabindex: -1 }, 'Try and keep'),
      el(
        'form',
        {
          class: 'card',
          onsubmit: (e: Event) => {
            e.preventDefault();
            void this.generate();
          },
        },
        field('Prompt', this.prompt),
        el(
          'div',
          { class: 'row' },
          field('Adapter', this.adapter),
          field('New tokens', this.tokens),
          field('Temperature (0 = most likely)', this.temperature),
        ),
        el('button', { type: 'submit', id: 'generate', class: 'primary' }, 'Generate'),
        el('button', { type: 'button', class: 'quiet', onclick: () => this.generating?.abort() }, 'Stop'),
        el(
          'div',
          { class: 'side-by-side' },
          el('div', {}, el('h3', {}, 'Base model'), this.base),
          el('div', {}, el('h3', {}, 'With the adapter'), this.tuned),
        ),
      ),
      el(
        'div',
        { class: 'card' },
        el('h3', {}, 'Your adapters'),
        el(
          'p',
          { class: 'muted' },
          'Kept in this browser. Downloads are in the Hugging Face PEFT format (PEFT, vLLM, llama.cpp).',
        ),
        this.library,
        field('Import a PEFT adapter (adapter_config.json + adapter_model.safetensors, or a zip)', importer),
      ),
    );
    this.refresh();
  }

  private async generate(): Promise<void> {
    const { studio } = this;
    const adapter = this.adapter.value;
    if (!studio.model) {
      studio.fail(new Error('Load a model first.'));
      return;
    }
    this.generating?.abort();
    const controller = new AbortController();
    this.generating = controller;
    const options = {
      maxTokens: Number(this.tokens.value) || 48,
      temperature: Number(this.temperature.value) || 0,
      seed: 1,
      signal: controller.signal,
    };
    fill(this.base);
    fill(this.tuned, adapter ? '' : 'Train or import an adapter to compare.');
    delete this.base.dataset.done;
    delete this.tuned.dataset.done;
    // Textual output only: appended as text nodes.
    const stream = (out: HTMLElement) => (piece: string) => out.append(piece);
    try {
      await Promise.all([
        studio.trainer
          .generate(this.prompt.value, { ...options, adapter: null, onToken: stream(this.base) })
          .then(() => {
            this.base.dataset.done = 'true';
          }),
        adapter
          ? studio.trainer
              .generate(this.prompt.value, { ...options, adapter, onToken: stream(this.tuned) })
              .then(() => {
                this.tuned.dataset.done = 'true';
              })
          : Promise.resolve(),
      ]);
    } catch (error) {
      studio.fail(error);
    }
  }

  private row(a: AdapterEntry): HTMLElement {
    const { studio } = this;
    const act = (label: string, fn: () => Promise<void>, cls = 'quiet') =>
      el(
        'button',
        {
          type: 'button',
          class: cls,
          'aria-label': `${label} ${a.name}`,
          onclick: async () => {
            try {
              await fn();
            } catch (error) {
              studio.fail(error);
            }
          },
        },
        label,
      );
    return el(
      'tr',
      { 'data-adapter': a.name },
      el('th', { scope: 'row' }, a.name),
      el('td', {}, a.baseModel ?? '–'),
      el('td', {}, a.origin === 'imported' ? 'imported' : String(a.steps)),
      el('td', {}, a.trainLoss === undefined ? '–' : a.trainLoss.toFixed(3)),
      el('td', {}, a.validationLoss === undefined ? '–' : a.validationLoss.toFixed(3)),
      el('td', {}, new Date(a.created).toLocaleString()),
      el('td', {}, bytes(a.bytes)),
      el(
        'td',
        { class: 'actions' },
        act('Download', async () => {
          const files = await studio.trainer.adapters.export(a.name);
          for (const [name, blob] of Object.entries(files)) download(blob, name);
        }),
        act('Zip', async () => download(await studio.trainer.adapters.exportZip(a.name), `${a.name}.zip`)),
        act('Cluster job', async () => download(await studio.trainer.adapters.exportJob(a.name), `${a.name}-job.zip`)),
        act('Continue training', async () => {
          studio.continueFrom = a.name;
          studio.go('configure');
        }),
        act('Rename', async () => {
          const to = prompt(`New name for ${a.name}`, a.name);
          if (to && to !== a.name) {
            await studio.trainer.adapters.rename(a.name, to);
            await studio.refreshLibrary();
          }
        }),
        act(
          'Delete',
          async () => {
            if (confirm(`Delete the adapter ${a.name}?`)) {
              await studio.trainer.adapters.delete(a.name);
              await studio.refreshLibrary();
            }
          },
          'danger',
        ),
      ),
    );
  }

  refresh(): void {
    const { studio } = this;
    const current = this.adapter.value;
    const usable = studio.adapters;
    fill(
      this.adapter,
      el('option', { value: '' }, 'none (base model only)'),
      ...usable.map((a) => el('option', { value: a.name, selected: a.name === current }, a.name)),
    );
    if (!current && usable[0]) this.adapter.value = usable[0].name;
    fill(
      this.library,
      usable.length === 0
        ? el('p', { class: 'muted' }, 'No adapter yet.')
        : el(
            'table',
            {},
            el(
              'thead',
              {},
              el(
                'tr',
                {},
                ...['Name', 'Base model', 'Steps', 'Loss', 'Validation', 'Created', 'Size', 'Actions'].map((h) =>
                  el('th', { scope: 'col' }, h),
                ),
              ),
            ),
            el('tbody', {}, ...usable.map((a) => this.row(a))),
          ),
    );
  }
}
