// A web app as a developer would write it after `npm install @webtune/train`: no bundler plugin,
// no configuration. e2e/package.node.test.ts builds it with Vite from the packed tarballs and
// drives these functions from Playwright.
import { createTrainer } from '@webtune/train';

const MODEL = new URL('/models/stories260K/', location.href).href;
const STORY = [
  'Once upon a time there was a little cat. The cat liked to sleep in the sun.',
  'One day the cat saw a bird. The bird sang a happy song.',
  'The cat and the bird became friends. They played in the garden every day.',
  'Lily had a red ball. She threw the ball to her dog, and the dog ran fast.',
].join('\n');
const TEXT = Array.from({ length: 12 }, () => STORY).join('\n');
const CONFIG = { batch: 2, seed: 3, lora: { rank: 4 }, optimizer: { lr: 5e-2 }, checkpointEvery: 2 };

let trainer;
let run;
const events = [];

async function ready() {
  if (!trainer) {
    trainer = await createTrainer();
    await trainer.loadModel(MODEL);
    await trainer.loadDataset(TEXT, { file: 'stories.txt', seq: 32 });
  }
  return trainer;
}

const summary = (result) => ({ ...result, losses: events.filter((e) => e.type === 'step').map((e) => e.loss) });

window.app = {
  events: () => events.map((e) => ({ type: e.type, step: e.step, loss: e.loss })),
  inWorker: async () => (await ready()).inWorker,
  /** Trains to the end and returns the result with every step's loss. */
  async train(name, steps, whenBusy = 'error') {
    const t = await ready();
    events.length = 0;
    run = t.train({ ...CONFIG, name, steps }, { onProgress: (p) => events.push(p), whenBusy });
    return summary(await run.done);
  },
  /** Starts a run without waiting for it. */
  async start(name, steps) {
    const t = await ready();
    events.length = 0;
    run = t.train({ ...CONFIG, name, steps }, { onProgress: (p) => events.push(p) });
    run.done.then(
      (r) => {
        window.finished = r;
      },
      (e) => {
        window.failed = `${e.name}: ${e.message}`;
      },
    );
    return run.name;
  },
  async checkpoints() {
    return (await (await ready()).listCheckpoints()).map((c) => ({ name: c.name, step: c.step }));
  },
  async resume(name) {
    const t = await ready();
    events.length = 0;
    run = await t.resumeTraining(name, { onProgress: (p) => events.push(p) });
    return summary(await run.done);
  },
  async adapters() {
    return (await (await ready()).adapters.list()).map((a) => ({
      name: a.name,
      steps: a.steps,
      trainLoss: a.trainLoss,
    }));
  },
  /** The exported PEFT files: adapter_config.json and the safetensors header. */
  async exported(name) {
    const files = await (await ready()).adapters.export(name);
    const bytes = new Uint8Array(await files['adapter_model.safetensors'].arrayBuffer());
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
    return { config: JSON.parse(await files['adapter_config.json'].text()), header };
  },
  async generate(prompt, adapter) {
    return (await (await ready()).generate(prompt, { adapter, maxTokens: 12, temperature: 0 })).text;
  },
};

document.getElementById('status').textContent = 'ready';
document.body.dataset.ready = 'true';
