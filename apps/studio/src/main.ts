/**
 * webtune studio: pick a model, drop in data, train a LoRA adapter, try it beside the base model
 * and keep it. The trainer runs in a Web Worker (createTrainer's default), so the page never
 * waits on the GPU or the tokenizer; this file only wires the five places together.
 */

import { registerSW } from 'virtual:pwa-register';
import { createTrainer } from '@webtune/train';
import { ConfigurePlace } from './places/configure.js';
import { DataPlace } from './places/data.js';
import { loadModel, ModelPlace } from './places/model.js';
import { TrainPlace } from './places/train.js';
import { TryPlace } from './places/try.js';
import { BUNDLED_MODEL, PLACES, Studio } from './studio.js';
import { byId, el, fill } from './ui.js';
import './style.css';

// Offline after the first visit: the service worker precaches the app, the bundled model and data.
// A new version is used from the next visit on; the page says so rather than reloading itself.
registerSW({
  immediate: true,
  onNeedRefresh() {
    document.getElementById('update')?.removeAttribute('hidden');
  },
});

async function main(): Promise<void> {
  let trainer: Awaited<ReturnType<typeof createTrainer>>;
  try {
    trainer = await createTrainer();
  } catch (error) {
    new Studio(undefined as never).fail(error);
    return;
  }
  const studio = new Studio(trainer);
  const places = {
    model: new ModelPlace(studio),
    data: new DataPlace(studio),
    configure: new ConfigurePlace(studio),
    train: new TrainPlace(studio),
    try: new TryPlace(studio),
  };
  places.configure.onStart = (config) => void places.train.start(config);
  const nav = byId('places');
  const main = byId('main');
  fill(main, ...Object.values(places).map((p) => p.root));
  const render = () => {
    fill(
      nav,
      ...PLACES.map((p, i) =>
        el(
          'button',
          {
            type: 'button',
            id: `nav-${p.id}`,
            'aria-current': studio.place === p.id ? 'page' : undefined,
            onclick: () => studio.go(p.id),
          },
          el('span', { class: 'num' }, i + 1),
          p.title,
        ),
      ),
    );
    for (const [id, place] of Object.entries(places)) {
      place.root.hidden = id !== studio.place;
      place.refresh();
    }
  };
  studio.onChange(render);
  render();
  try {
    studio.device = await trainer.device();
    byId('gpu').textContent = `GPU: ${studio.device.description}${studio.device.software ? ' (software)' : ''}`;
  } catch (error) {
    studio.fail(error);
    document.body.dataset.ready = 'true';
    return;
  }
  await studio.refreshLibrary();
  await loadModel(studio, BUNDLED_MODEL.url, 'Loading stories260K');
  document.body.dataset.ready = 'true';
  if (studio.checkpoints.length > 0) studio.go('train');
}

void main();
