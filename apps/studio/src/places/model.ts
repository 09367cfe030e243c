/**
 * Model: the bundled stories260K (no download), a curated list from the Hub (downloaded with a
 * byte progress bar, then kept offline), any Hub repo id, a folder or a .gguf file from this
 * computer; and how the frozen weights are held on the GPU (16-bit, or QLoRA's 8- and 4-bit
 * blocks, which let a bigger model fit).
 */
import type { LoadModelOptions, ModelInput } from '@webtune/train';
import { BUNDLED_MODEL, type Studio } from '../studio.js';
import { bytes, count, el, field, fill } from '../ui.js';

export const CURATED = [
  { id: 'HuggingFaceTB/SmolLM2-135M-Instruct', note: '135 M parameters, chat' },
  { id: 'HuggingFaceTB/SmolLM2-360M-Instruct', note: '360 M parameters, chat' },
  { id: 'Qwen/Qwen2.5-0.5B-Instruct', note: '0.5 B parameters, chat' },
  { id: 'Qwen/Qwen3-0.6B', note: '0.6 B parameters, chat with thinking' },
  { id: 'TinyLlama/TinyLlama-1.1B-Chat-v1.0', note: '1.1 B parameters, chat' },
  { id: 'openai-community/gpt2', note: '124 M parameters, plain text' },
];

/** The weight precision chosen on the Model place ('' = automatic: f16, or as a GGUF file stores it). */
export function chosenPrecision(): LoadModelOptions['precision'] | undefined {
  const select = document.getElementById('model-precision') as HTMLSelectElement | null;
  return (select?.value || undefined) as LoadModelOptions['precision'] | undefined;
}

export async function loadModel(studio: Studio, input: ModelInput, label: string, id?: string): Promise<void> {
  studio.clearError();
  studio.loading = { label, loaded: 0, total: 0 };
  studio.changed();
  // Progress comes through its own channel from the worker and may trail the result.
  let finished = false;
  const precision = chosenPrecision();
  try {
    studio.model = await studio.trainer.loadModel(input, {
      ...(id ? { id } : {}),
      ...(precision ? { precision } : {}),
      onProgress: (p) => {
        if (finished) return;
        if (p.type === 'download')
          studio.loading = { label: `Downloading ${p.file}`, loaded: p.loaded, total: p.total };
        else if (p.type === 'weights')
          studio.loading = { label: 'Uploading weights to the GPU', loaded: p.loaded, total: p.total };
        studio.changed();
      },
    });
    studio.dataset = undefined;
    studio.preview = [];
    studio.device = studio.model.device;
  } catch (error) {
    studio.fail(error);
  } finally {
    finished = true;
    studio.loading = undefined;
    studio.changed();
  }
}

export class ModelPlace {
  readonly root: HTMLElement;
  private readonly status = el('div', { class: 'card', id: 'model-status', 'aria-live': 'polite' });
  private readonly curated = el('ul', { class: 'choices' });
  private cached = new Set<string>();

  constructor(private readonly studio: Studio) {
    const repo = el('input', { id: 'hub-repo', type: 'text', placeholder: 'owner/name', autocomplete: 'off' });
    const folder = el('input', { id: 'model-folder', type: 'file', multiple: true });
    folder.setAttribute('webkitdirectory', '');
    folder.addEventListener('change', () => {
      if (folder.files?.length) void loadModel(studio, folder.files, 'Reading the folder');
    });
    const gguf = el('input', { id: 'model-gguf', type: 'file', accept: '.gguf' });
    gguf.addEventListener('change', () => {
      if (gguf.files?.length) void loadModel(studio, gguf.files, 'Reading the GGUF file');
    });
    const precision = el(
      'select',
      { id: 'model-precision' },
      el('option', { value: '' }, 'Automatic: 16-bit (a GGUF file: as it is stored)'),
      el('option', { value: 'f16' }, '16-bit (f16)'),
      el('option', { value: 'q8_0' }, '8-bit (q8_0): about half the memory'),
      el('option', { value: 'q4_0' }, '4-bit (q4_0, QLoRA): about a quarter, for bigger models'),
    );
    const drop = el(
      'div',
      { class: 'drop', tabindex: 0, role: 'group', 'aria-label': 'Drop a model folder or a GGUF file here' },
      'Drop a model folder (config.json, tokenizer.json, model.safetensors) or a .gguf file here',
    );
    drop.addEventListener('dragover', (e) => e.preventDefault());
    drop.addEventListener('drop', (e) => {
      e.preventDefault();
      const files = e.dataTransfer?.files;
      if (files?.length) void loadModel(studio, files, 'Reading the dropped files');
    });
    this.root = el(
      'section',
      { id: 'place-model', class: 'place', 'aria-labelledby': 'model-title' },
      el('h2', { id: 'model-title', tabindex: -1 }, 'Choose a model'),
      el('p', { class: 'lead' }, 'The model runs on your own GPU. Nothing you train or type leaves this computer.'),
      this.status,
      el(
        'div',
        { class: 'card' },
        el('h3', {}, 'Weights on the GPU'),
        field(
          'Precision of the frozen model',
          precision,
          'used for the next model you load; the adapter itself always trains in 32-bit',
        ),
      ),
      el(
        'div',
        { class: 'card' },
        el('h3', {}, 'Bundled, works offline'),
        el(
          'button',
          {
            type: 'button',
            id: 'use-bundled',
            class: 'primary',
            onclick: () => void loadModel(studio, BUNDLED_MODEL.url, 'Loading stories260K', BUNDLED_MODEL.id),
          },
          'Use stories260K',
        ),
        el(
          'small',
          {},
          ' A tiny Llama-architecture model trained on children’s stories (260 K parameters). Trains in seconds.',
        ),
      ),
      el(
        'div',
        { class: 'card' },
        el('h3', {}, 'From the Hugging Face Hub (downloaded once, then kept offline)'),
        this.curated,
      ),
      el(
        'form',
        {
          class: 'card row',
          onsubmit: (e: Event) => {
            e.preventDefault();
            const id = repo.value.trim();
            if (id) void loadModel(studio, id, `Fetching ${id}`);
          },
        },
        field('Any Hub repository', repo),
        el('button', { type: 'submit' }, 'Load'),
      ),
      el(
        'div',
        { class: 'card' },
        el('h3', {}, 'From this computer'),
        field('Model folder', folder),
        field('GGUF file (llama.cpp, Ollama, LM Studio)', gguf),
        drop,
      ),
    );
    this.refresh();
    void this.refreshCached();
  }

  private async refreshCached(): Promise<void> {
    try {
      this.cached = new Set((await this.studio.trainer.cachedModels()).map((m) => m.id));
      this.refresh();
    } catch {
      // No cache in this browser: every model downloads.
    }
  }

  refresh(): void {
    const { studio } = this;
    fill(
      this.curated,
      ...CURATED.map((m) =>
        el(
          'li',
          {},
          el(
            'button',
            {
              type: 'button',
              disabled: studio.loading !== undefined,
              onclick: async () => {
                await loadModel(studio, m.id, `Fetching ${m.id}`);
                await this.refreshCached();
              },
            },
            m.id,
          ),
          el('small', {}, ` ${m.note}${this.cached.has(m.id) ? ' · downloaded' : ''}`),
        ),
      ),
    );
    const loading = studio.loading;
    if (loading) {
      fill(
        this.status,
        el('p', {}, loading.label, loading.total ? ` — ${bytes(loading.loaded)} of ${bytes(loading.total)}` : ''),
        el('progress', {
          id: 'model-progress',
          'aria-label': 'Model loading',
          max: loading.total || 1,
          value: loading.total ? loading.loaded : 0,
        }),
      );
      return;
    }
    const m = studio.model;
    if (!m) {
      fill(this.status, el('p', {}, 'No model loaded yet.'));
      return;
    }
    const d = m.device;
    fill(
      this.status,
      el(
        'p',
        { id: 'model-loaded' },
        el('strong', {}, m.id),
        ` is ready on ${d.description}${d.software ? ' (a software GPU: slow)' : ''}.`,
      ),
      el(
        'dl',
        { class: 'facts' },
        el('dt', {}, 'Architecture'),
        el('dd', {}, `${m.architecture} (${m.layers} layers, width ${m.hiddenSize})`),
        el('dt', {}, 'Parameters'),
        el('dd', {}, count(m.parameters)),
        el('dt', {}, 'Weights on the GPU'),
        el('dd', {}, `${bytes(m.bytes)} (${m.precision})`),
        el('dt', {}, 'This GPU allows'),
        el('dd', {}, `${bytes(d.maxBufferSize)} per buffer, ${bytes(d.maxStorageBufferBindingSize)} per binding`),
        el('dt', {}, 'Context'),
        el('dd', {}, `${m.maxPositions} tokens`),
      ),
      el('button', { type: 'button', class: 'primary', onclick: () => studio.go('data') }, 'Next: your data'),
    );
  }
}
