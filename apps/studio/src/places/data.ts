/**
 * Data: drop or pick a file (or take the example), see the first examples as tokens with the
 * trained ones marked, and what the data holds. Tokenizing happens in the worker.
 */
import { type DataChoice, EXAMPLE_DATA, type Studio } from '../studio.js';
import { count, el, field, fill } from '../ui.js';

/** Loads data as chosen (a File, or the example fetched from this site) and shows its preview. */
export async function loadData(studio: Studio, choice: DataChoice, file?: File): Promise<boolean> {
  studio.clearError();
  try {
    const input = file ?? (await (await fetch(EXAMPLE_DATA.url)).blob());
    studio.dataset = await studio.trainer.loadDataset(input, { ...choice.options, file: choice.file });
    studio.dataChoice = choice;
    studio.preview = await studio.trainer.previewExamples(0, 3);
    return true;
  } catch (error) {
    studio.fail(error);
    return false;
  } finally {
    studio.changed();
  }
}

export class DataPlace {
  readonly root: HTMLElement;
  private readonly stats = el('div', { id: 'data-stats', 'aria-live': 'polite' });
  private readonly preview = el('div', { id: 'data-preview' });
  private readonly seq = el('input', { id: 'data-seq', type: 'number', min: 8, max: 4096, step: 8, value: 128 });
  private readonly validation = el('input', {
    id: 'data-validation',
    type: 'number',
    min: 0,
    max: 50,
    step: 5,
    value: 10,
  });
  private readonly skip = el('input', { id: 'data-skip', type: 'checkbox' });
  private busy = false;

  constructor(private readonly studio: Studio) {
    const picker = el('input', { id: 'data-file', type: 'file', accept: '.jsonl,.ndjson,.txt,.csv,.tsv,.md' });
    picker.addEventListener('change', () => {
      const f = picker.files?.[0];
      if (f) void this.load(f);
      picker.value = '';
    });
    const drop = el(
      'div',
      { class: 'drop', tabindex: 0, role: 'group', 'aria-label': 'Drop a data file here' },
      'Drop a .jsonl, .txt, .csv or .tsv file here',
    );
    drop.addEventListener('dragover', (e) => e.preventDefault());
    drop.addEventListener('drop', (e) => {
      e.preventDefault();
      const f = e.dataTransfer?.files?.[0];
      if (f) void this.load(f);
    });
    this.root = el(
      'section',
      { id: 'place-data', class: 'place', 'aria-labelledby': 'data-title' },
      el('h2', { id: 'data-title', tabindex: -1 }, 'Your data'),
      el(
        'p',
        { class: 'lead' },
        'Plain text, or JSON Lines with {"text"}, {"prompt", "completion"}, {"messages"} or {"instruction", "input", "output"} records, or CSV/TSV with those columns. The file stays on this computer.',
      ),
      el(
        'div',
        { class: 'card' },
        el(
          'button',
          { type: 'button', id: 'use-example', class: 'primary', onclick: () => void this.load() },
          'Use the example stories',
        ),
        el('small', {}, ' 60 short stories in the bundled model’s style.'),
      ),
      el('div', { class: 'card' }, field('Data file', picker), drop),
      el(
        'details',
        { class: 'card' },
        el('summary', {}, 'Reading options'),
        el(
          'div',
          { class: 'row' },
          field('Tokens per example', this.seq, 'longer examples are cut'),
          field('Held out for validation (%)', this.validation),
          field('Skip malformed lines', this.skip),
        ),
      ),
      this.stats,
      this.preview,
    );
    this.refresh();
  }

  private async load(file?: File): Promise<void> {
    if (this.busy) return;
    if (!this.studio.model) {
      this.studio.fail(new Error('Load a model first: data is tokenized with the model’s tokenizer.'));
      return;
    }
    this.busy = true;
    fill(this.stats, el('p', {}, 'Reading and tokenizing…'));
    const choice: DataChoice = {
      file: file?.name ?? EXAMPLE_DATA.name,
      example: file === undefined,
      options: {
        seq: Math.min(Number(this.seq.value) || 128, this.studio.model.maxPositions),
        validation: Math.max(0, Math.min(50, Number(this.validation.value) || 0)) / 100,
        seed: 0,
        skipBadLines: this.skip.checked,
      },
    };
    await loadData(this.studio, choice, file);
    this.busy = false;
    this.refresh();
  }

  refresh(): void {
    const { studio } = this;
    const s = studio.dataset;
    if (!s) {
      if (!this.busy) fill(this.stats, el('p', { class: 'muted' }, 'No data loaded yet.'));
      fill(this.preview);
      return;
    }
    fill(
      this.stats,
      el(
        'div',
        { class: 'card' },
        el('p', { id: 'data-summary' }, el('strong', {}, s.file), ` (${s.format}): ready to train.`),
        el(
          'dl',
          { class: 'facts' },
          el('dt', {}, 'Examples'),
          el('dd', {}, `${count(s.examples)} for training, ${count(s.validation)} for validation`),
          el('dt', {}, 'Tokens'),
          el('dd', {}, `${count(s.tokens)}, of which ${count(s.trainedTokens)} are trained on`),
          el('dt', {}, 'Cut to length'),
          el('dd', {}, `${s.truncated} examples (at ${s.seq} tokens); ${s.dropped} left out`),
          el('dt', {}, 'Malformed lines'),
          el('dd', {}, s.badLines ? `${s.badLines} skipped (first on line ${s.skippedLines[0]?.line})` : 'none'),
        ),
        el('button', { type: 'button', class: 'primary', onclick: () => studio.go('configure') }, 'Next: configure'),
      ),
    );
    fill(
      this.preview,
      el('h3', {}, 'The first examples, as the model sees them'),
      el(
        'p',
        { class: 'legend' },
        el('span', { class: 'tok trained' }, 'trained on'),
        ' ',
        el('span', { class: 'tok' }, 'context only'),
      ),
      ...studio.preview.map((ex) =>
        el(
          'div',
          { class: 'example', 'data-example': ex.index },
          el(
            'small',
            {},
            ex.line ? `line ${ex.line}` : `example ${ex.index + 1}`,
            ex.truncated ? ' · cut to length' : '',
          ),
          el(
            'p',
            { class: 'tokens' },
            ...ex.tokens.map((t) =>
              el('span', { class: t.trained ? 'tok trained' : 'tok', title: `id ${t.id}` }, t.text),
            ),
          ),
        ),
      ),
    );
  }
}
