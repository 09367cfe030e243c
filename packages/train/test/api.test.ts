// The public API (createTrainer) end to end on stories260K: one suite, run by every
// implementation — in this thread under Node (adapters in a folder), and in Chromium both in this
// thread and in the module Worker (adapters in IndexedDB). Reloading the page and tabs contending
// for the GPU are in e2e/trainer.node.test.ts.
import { unzipSync } from 'fflate';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import {
  AdapterExistsError,
  AdapterNotFoundError,
  BaseModelMismatchError,
  CheckpointNotFoundError,
  type CreateTrainerOptions,
  createTrainer,
  DataError,
  NotLoadedError,
  RunMismatchError,
  type Trainer,
  type TrainerProgress,
  TrainingDivergedError,
} from '../src/index.js';

const inBrowser = typeof window !== 'undefined' && typeof document !== 'undefined';

async function modelPath(): Promise<string> {
  if (inBrowser) return new URL('/apps/studio/public/models/stories260K/', window.location.origin).href;
  const { fileURLToPath } = await import('node:url');
  return fileURLToPath(new URL('../../../apps/studio/public/models/stories260K', import.meta.url));
}

async function storageFor(label: string): Promise<NonNullable<CreateTrainerOptions['storage']>> {
  const unique = `${label}-${Date.now().toString(36)}-${Math.floor(Math.random() * 1e6)}`;
  if (inBrowser) return { indexedDb: `webtune-test-${unique}` };
  const { mkdtemp } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  return { directory: await mkdtemp(`${tmpdir()}/webtune-${unique}-`) };
}

const STORY = [
  'Once upon a time there was a little cat. The cat liked to sleep in the sun.',
  'One day the cat saw a bird. The bird sang a happy song.',
  'The cat and the bird became friends. They played in the garden every day.',
  'Lily had a red ball. She threw the ball to her dog, and the dog ran fast.',
].join('\n');
const TEXT = Array.from({ length: 12 }, () => STORY).join('\n');

const RUN = {
  steps: 8,
  batch: 2,
  checkpointEvery: 3,
  seed: 7,
  lora: { rank: 4, targets: 'all-linear' },
  optimizer: { lr: 1e-2 },
  schedule: { kind: 'cosine' as const, warmupSteps: 2 },
};

// Every test runs under Node and in Chromium's worker. Chromium's own thread runs the engine of
// the first (Node) with the storage of the second (IndexedDB), so there it runs the tests that
// train, generate, keep the library and free the GPU, not every recovery path again: those add
// minutes of pipeline builds on lavapipe and check nothing the other two runs do not.
const modes: { name: string; worker: boolean; every: boolean }[] = inBrowser
  ? [
      { name: 'in a worker', worker: true, every: true },
      { name: 'in this thread', worker: false, every: false },
    ]
  : [{ name: 'in this thread (Node)', worker: false, every: true }];

for (const mode of modes) {
  describe(`createTrainer ${mode.name}`, () => {
    let storage: NonNullable<CreateTrainerOptions['storage']>;
    let trainer: Trainer;
    let baseline = 0;
    const open = async () => {
      const t = await createTrainer({
        worker: mode.worker,
        storage,
        gpu: {
          featureLevel: inject('featureLevel') ?? 'core',
          kernelProfile: inject('kernelProfile') ?? 'auto',
          matmulStaging: inject('matmulStaging') ?? 'auto',
        },
      });
      await t.loadModel(await modelPath(), { precision: 'f32' });
      await t.loadDataset(TEXT, { file: 'stories.txt', seq: 32, validation: 0.25, seed: 1 });
      return t;
    };

    beforeAll(async () => {
      storage = await storageFor(mode.worker ? 'worker' : 'thread');
      trainer = await open();
      expect(trainer.inWorker).toBe(mode.worker);
      baseline = (await trainer.diagnostics()).liveBuffers;
    }, 120_000);

    afterAll(async () => {
      await trainer?.dispose();
    });

    let uninterrupted: { losses: number[]; final: number; validation: number | undefined };

    /** Starts run `name` of RUN and pauses it when step `step` is reported; resolves once paused. */
    const trainPausedAt = async (name: string, step: number) => {
      const events: TrainerProgress[] = [];
      let paused: Promise<void> | undefined;
      const run = trainer.train(
        { ...RUN, name },
        {
          onProgress: (p) => {
            events.push(p);
            if (p.type === 'step' && p.step === step) paused = run.pause();
          },
        },
      );
      while (!paused) await new Promise((r) => setTimeout(r, 20));
      await paused;
      return { run, events };
    };

    it('trains with progress events, evaluates, checkpoints and saves the adapter', async () => {
      const events: TrainerProgress[] = [];
      const run = trainer.train({ ...RUN, name: 'straight' }, { onProgress: (p) => events.push(p) });
      expect(run.name).toBe('straight');
      const result = await run.done;
      expect(result.status).toBe('completed');
      expect(result.steps).toBe(8);
      const steps = events.filter((e) => e.type === 'step');
      expect(steps.map((s) => s.step)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
      for (const s of steps) {
        expect(s.totalSteps).toBe(8);
        expect(Number.isFinite(s.loss) && Number.isFinite(s.gradNorm) && s.tokensPerSecond > 0).toBe(true);
      }
      expect(steps[0]?.lr).toBe(0); // warmup starts from 0, as transformers' schedulers do
      expect(events.filter((e) => e.type === 'eval').map((e) => e.step)).toEqual([3, 6, 8]);
      expect(events.filter((e) => e.type === 'checkpoint').map((e) => e.step)).toEqual([3, 6]);
      expect(events.at(-1)?.type).toBe('done');
      const losses = steps.map((s) => s.loss);
      expect(losses.at(-1)).toBeLessThan(losses[0] as number);
      uninterrupted = { losses, final: result.trainLoss as number, validation: result.validationLoss };
      expect(result.validationLoss).toBeDefined();
      const listed = await trainer.adapters.list();
      expect(listed.map((a) => a.name)).toContain('straight');
      const entry = listed.find((a) => a.name === 'straight');
      expect(entry?.steps).toBe(8);
      expect(entry?.config.r).toBe(4);
      expect(entry?.origin).toBe('trained');
      expect(await trainer.listCheckpoints()).toEqual([]); // a completed run leaves no checkpoint
      const d = await trainer.diagnostics();
      expect(d.liveBuffers).toBe(baseline);
      expect(d.gpuErrors).toEqual([]);
    }, 300_000);

    it.runIf(mode.every)(
      'pauses and resumes to the same losses as the uninterrupted run',
      async () => {
        const { run, events } = await trainPausedAt('paused', 2);
        const at = events.filter((e) => e.type === 'paused');
        expect(at).toHaveLength(1);
        const stepAtPause = (at[0] as { step: number }).step;
        // A paused run has saved its checkpoint.
        const saved = await trainer.listCheckpoints();
        expect(saved.find((c) => c.name === 'paused')?.step).toBe(stepAtPause);
        await run.resume();
        const result = await run.done;
        expect(events.some((e) => e.type === 'resumed')).toBe(true);
        const losses = events.filter((e) => e.type === 'step').map((e) => e.loss);
        expect(losses).toEqual(uninterrupted.losses);
        expect(result.trainLoss).toBe(uninterrupted.final);
      },
      300_000,
    );

    it.runIf(mode.every)(
      'stops on dispose with its checkpoint, and resumeTraining in a new trainer ends with the same loss',
      async () => {
        let stopAt: Promise<void> | undefined;
        const run = trainer.train(
          { ...RUN, name: 'reloaded' },
          {
            onProgress: (p) => {
              if (p.type === 'step' && p.step === 4) stopAt = trainer.dispose();
            },
          },
        );
        const stopped = await run.done;
        await stopAt;
        expect(stopped.status).toBe('stopped');
        expect(stopped.steps).toBeGreaterThanOrEqual(4);
        expect(stopped.steps).toBeLessThan(8);
        trainer = await open();
        const saved = await trainer.listCheckpoints();
        expect(saved.map((c) => c.name)).toEqual(['reloaded']);
        const events: TrainerProgress[] = [];
        const again = await trainer.resumeTraining('reloaded', { onProgress: (p) => events.push(p) });
        const result = await again.done;
        expect(result.status).toBe('completed');
        expect(events.find((e) => e.type === 'step')?.step).toBe(stopped.steps + 1);
        const rel = Math.abs((result.trainLoss as number) - uninterrupted.final) / uninterrupted.final;
        expect(rel).toBeLessThanOrEqual(1e-5);
        expect(result.validationLoss).toBeCloseTo(uninterrupted.validation as number, 5);
        baseline = (await trainer.diagnostics()).liveBuffers;
      },
      300_000,
    );

    it('generates with and without an adapter, moving only the adapter tensors', async () => {
      const run = trainer.train({ ...RUN, name: 'loud', steps: 12, optimizer: { lr: 5e-2 }, checkpointEvery: 0 });
      await run.done;
      const before = await trainer.diagnostics();
      const base = await trainer.generate('Once upon a time', { maxTokens: 16, temperature: 0 });
      const pieces: string[] = [];
      const tuned = await trainer.generate('Once upon a time', {
        maxTokens: 16,
        temperature: 0,
        adapter: 'loud',
        onToken: (t) => pieces.push(t),
      });
      expect(base.text.length).toBeGreaterThan(0);
      expect(tuned.text).not.toBe(base.text);
      expect(pieces.join('')).toBe(tuned.text);
      const again = await trainer.generate('Once upon a time', { maxTokens: 16, temperature: 0, adapter: null });
      expect(again.text).toBe(base.text);
      const after = await trainer.diagnostics();
      const adapterBytes = (await trainer.adapters.get('loud'))?.bytes ?? 0;
      // The base weights stay where they were: only the adapter's A and B were added.
      expect(after.liveBytes - before.liveBytes).toBeLessThanOrEqual(adapterBytes + 4096);
      expect(after.gpuErrors).toEqual([]);
      const aborted = new AbortController();
      const cut = await trainer.generate('Once', {
        maxTokens: 50,
        temperature: 0,
        signal: aborted.signal,
        onToken: () => aborted.abort(),
      });
      expect(cut.stopReason).toBe('aborted');
      expect(cut.tokens).toBeLessThan(50);
    }, 300_000);

    it('keeps a library: rename, export, zip, import, delete, with typed errors', async () => {
      const files = await trainer.adapters.export('loud');
      const config = JSON.parse(await files['adapter_config.json'].text());
      expect(config.peft_type).toBe('LORA');
      expect(config.r).toBe(4);
      const weights = new Uint8Array(await files['adapter_model.safetensors'].arrayBuffer());
      const headerLength = Number(new DataView(weights.buffer).getBigUint64(0, true));
      const header = JSON.parse(new TextDecoder().decode(weights.subarray(8, 8 + headerLength)));
      expect(header['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'].shape).toEqual([4, 64]);
      const zip = await trainer.adapters.exportZip('loud');
      expect(zip.size).toBeGreaterThan(100);

      await trainer.adapters.rename('loud', 'renamed');
      expect((await trainer.adapters.get('loud')) === undefined).toBe(true);
      await expect(trainer.adapters.rename('renamed', 'straight')).rejects.toBeInstanceOf(AdapterExistsError);
      await expect(trainer.adapters.delete('nope')).rejects.toBeInstanceOf(AdapterNotFoundError);
      await expect(trainer.adapters.rename('nope', 'x')).rejects.toThrow(/no adapter named "nope"/);

      const imported = await trainer.adapters.import(
        {
          'adapter_config.json': files['adapter_config.json'],
          'adapter_model.safetensors': files['adapter_model.safetensors'],
        },
        { name: 'imported' },
      );
      expect(imported.origin).toBe('imported');
      const fromZip = await trainer.adapters.import([new File([zip], 'loud.zip')], { name: 'from-zip' });
      expect(fromZip.config.r).toBe(4);
      const a = await trainer.generate('Lily', { maxTokens: 8, temperature: 0, adapter: 'renamed' });
      const b = await trainer.generate('Lily', { maxTokens: 8, temperature: 0, adapter: 'imported' });
      const c = await trainer.generate('Lily', { maxTokens: 8, temperature: 0, adapter: 'from-zip' });
      expect(b.text).toBe(a.text);
      expect(c.text).toBe(a.text);
      // The cluster job: the adapter, the loaded data as tokenized JSONL, the settings, the script.
      const job = unzipSync(new Uint8Array(await (await trainer.adapters.exportJob('renamed')).arrayBuffer()));
      const names = Object.keys(job);
      expect(names).toEqual(expect.arrayContaining(['job.json', 'train.py', 'adapter/adapter_config.json']));
      const settings = JSON.parse(new TextDecoder().decode(job['job.json']));
      expect(settings.lora.r).toBe(4);
      expect(settings.training.max_steps).toBe(12);
      const lines = new TextDecoder().decode(job['data/train.jsonl']).trim().split('\n');
      expect(lines.length).toBeGreaterThan(0);
      await trainer.adapters.delete('imported');
      await trainer.adapters.delete('from-zip');
      expect((await trainer.adapters.list()).map((e) => e.name).sort()).toEqual(
        mode.every ? ['paused', 'reloaded', 'renamed', 'straight'] : ['renamed', 'straight'],
      );
    }, 300_000);

    it.runIf(mode.every)(
      'refuses bad input with typed errors that name what is wrong',
      async () => {
        const bad = '{"text": "fine"}\n{"text": oops}\n';
        const error = await trainer.loadDataset(bad, { file: 'bad.jsonl', seq: 32 }).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(DataError);
        expect((error as DataError).line).toBe(2);
        expect((error as Error).message).toMatch(/bad\.jsonl, line 2/);
        await expect(trainer.resumeTraining('never-ran')).rejects.toBeInstanceOf(CheckpointNotFoundError);
        await expect(trainer.adapters.import({ 'adapter_config.json': new Blob(['{}']) })).rejects.toThrow(
          /needs adapter_config.json and adapter_model.safetensors/,
        );
        // A run saved on one dataset does not resume on another.
        const run = trainer.train({ ...RUN, name: 'mismatch' });
        await run.pause();
        await trainer.dispose();
        trainer = await createTrainer({
          worker: mode.worker,
          storage,
          gpu: {
            featureLevel: inject('featureLevel') ?? 'core',
            kernelProfile: inject('kernelProfile') ?? 'auto',
            matmulStaging: inject('matmulStaging') ?? 'auto',
          },
        });
        await expect(trainer.train({ ...RUN, name: 'no-model' }).done).rejects.toBeInstanceOf(NotLoadedError);
        await trainer.loadModel(await modelPath(), { precision: 'f32' });
        await trainer.loadDataset(`${TEXT}\nAnother line.`, {
          file: 'stories.txt',
          seq: 32,
          validation: 0.25,
          seed: 1,
        });
        const mismatch = await (await trainer.resumeTraining('mismatch')).done.catch((e: unknown) => e);
        expect(mismatch).toBeInstanceOf(RunMismatchError);
        expect((mismatch as Error).message).toMatch(/other data/);
        await trainer.discardCheckpoint('mismatch');
        await trainer.loadDataset(TEXT, { file: 'stories.txt', seq: 32, validation: 0.25, seed: 1 });
      },
      300_000,
    );

    it.runIf(mode.every)(
      'recovers from a lost device at the last checkpoint and ends with the same loss',
      async () => {
        const { run, events } = await trainPausedAt('lost', 4);
        const pausedAt = (events.find((e) => e.type === 'paused') as { step: number }).step;
        // The GPU goes away (a driver reset, say) while the run holds its memory.
        await trainer.loseDevice();
        await run.resume();
        const result = await run.done;
        const recovered = events.find((e) => e.type === 'recovered');
        expect(recovered?.step).toBe(pausedAt);
        expect(result.steps).toBe(8);
        expect(result.trainLoss).toBe(uninterrupted.final);
        // The model came back on the new device: generation works.
        expect((await trainer.generate('Once', { maxTokens: 4, temperature: 0 })).tokens).toBeGreaterThan(0);
      },
      300_000,
    );

    it.runIf(mode.every)(
      'stops a diverging run, keeping its last good checkpoint',
      async () => {
        const events: TrainerProgress[] = [];
        const run = trainer.train(
          { ...RUN, name: 'diverge', optimizer: { lr: 1e30, maxGradNorm: null }, checkpointEvery: 1 },
          { onProgress: (p) => events.push(p) },
        );
        const error = await run.done.catch((e: unknown) => e);
        expect(error).toBeInstanceOf(TrainingDivergedError);
        expect(events.at(-1)?.type).toBe('error');
        const saved = (await trainer.listCheckpoints()).find((c) => c.name === 'diverge');
        expect(saved?.step).toBe((error as TrainingDivergedError).step - 1);
        await trainer.discardCheckpoint('diverge');
        // A run that throws frees its GPU memory too.
        expect((await trainer.diagnostics()).liveBuffers).toBe(baseline);
      },
      300_000,
    );

    it.runIf(mode.every)(
      'refuses an adapter trained on another base model',
      async () => {
        const other = inBrowser
          ? new URL('/packages/models/test/fixtures/tiny-llama/', window.location.origin).href
          : (await modelPath()).replace(
              'apps/studio/public/models/stories260K',
              'packages/models/test/fixtures/tiny-llama',
            );
        await trainer.loadModel(other, { precision: 'f32' });
        const error = await trainer.generate('hi', { adapter: 'straight', maxTokens: 2 }).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(BaseModelMismatchError);
        expect((error as Error).message).toMatch(/adapter "straight" was trained on .*stories260K/);
        await trainer.loadModel(await modelPath(), { precision: 'f32' });
        await trainer.loadDataset(TEXT, { file: 'stories.txt', seq: 32, validation: 0.25, seed: 1 });
      },
      300_000,
    );

    it.runIf(mode.every)(
      'trains on a q4_0 base and on a GGUF file; the GGUF adapter names the Hub model it came from',
      async () => {
        const q4 = await trainer.loadModel(await modelPath(), { precision: 'q4_0' });
        expect(q4.precision).toBe('q4_0');
        await trainer.loadDataset(TEXT, { file: 'stories.txt', seq: 32 });
        const small = { steps: 4, batch: 2, seed: 3, lora: { rank: 4 }, optimizer: { lr: 1e-2 }, checkpointEvery: 0 };
        const onQ4 = await trainer.train({ ...small, name: 'on-q4' }).done;
        expect(onQ4.steps).toBe(4);
        expect(Number.isFinite(onQ4.trainLoss)).toBe(true);

        // A .gguf file as a user drops it in the page (a File), or its path under Node; its tokenizer
        // comes from the GGUF metadata.
        const ggufPath = 'packages/models/test/fixtures/gguf/gpt2/tiny-gpt2-q.gguf';
        const gguf = inBrowser
          ? [new File([await (await fetch(`/${ggufPath}`)).arrayBuffer()], 'tiny-gpt2-q.gguf')]
          : (await modelPath()).replace('apps/studio/public/models/stories260K', ggufPath);
        const info = await trainer.loadModel(gguf);
        expect(info.architecture).toBe('GPT2LMHeadModel');
        await trainer.loadDataset(TEXT, { file: 'stories.txt', seq: 32 });
        const onGguf = await trainer.train({ ...small, name: 'on-gguf' }).done;
        expect(Number.isFinite(onGguf.trainLoss)).toBe(true);
        const files = await trainer.adapters.export('on-gguf');
        const config = JSON.parse(await files['adapter_config.json'].text()) as Record<string, unknown>;
        expect(config.base_model_name_or_path).toBe('webtune-test/tiny-gpt2-q');
        expect(config.fan_in_fan_out).toBe(true);
        const { text } = await trainer.generate('Once', { adapter: 'on-gguf', maxTokens: 4, temperature: 0 });
        expect(typeof text).toBe('string');

        await trainer.loadModel(await modelPath(), { precision: 'f32' });
        await trainer.loadDataset(TEXT, { file: 'stories.txt', seq: 32, validation: 0.25, seed: 1 });
      },
      300_000,
    );

    it('cancel frees the GPU memory and discards the checkpoint; releasing the model leaves no buffer', async () => {
      const before = (await trainer.diagnostics()).liveBuffers;
      const run = trainer.train({ ...RUN, name: 'cancelled', checkpointEvery: 1 });
      await run.pause();
      await run.cancel();
      const result = await run.done;
      expect(result.status).toBe('cancelled');
      expect((await trainer.listCheckpoints()).some((c) => c.name === 'cancelled')).toBe(false);
      expect((await trainer.diagnostics()).liveBuffers).toBe(before);
      await trainer.releaseModel();
      const d = await trainer.diagnostics();
      expect(d.liveBuffers).toBe(0);
      expect(d.gpuErrors).toEqual([]);
    }, 300_000);
  });
}
