// The training job's train.py under real Python (TRL + PEFT + transformers + datasets), when a
// Python that has them is found (tools/python.ts: $WEBTUNE_PYTHON, .venv, tools/.venv, python3):
// --help; --dry-run's SFTConfig and LoraConfig against job.json; two real optimizer steps on CPU
// on the tiny-llama fixture, continuing the exported adapter, with the adapter written at the end
// read back by webtune; a job.json that lacks a field; and train.py's own check that TRL trained
// on the rows as written. Without such a Python every test here is skipped, and the reason is
// printed. Nothing is downloaded: the base model is the fixture folder and the Hub is set offline.
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { namedModules } from '@webtune/models';
import { unzipSync } from 'fflate';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findPython, pythonHas } from '../../../tools/python.js';
import { buildTrainingJob, type TrainingJobJson } from '../src/job/index.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, importPeftAdapter } from '../src/lora/index.js';
import { jobInput, TINY_LLAMA, TINY_LLAMA_CONFIG } from './job-fixture.js';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const python = findPython(root);
const probe =
  python === undefined
    ? undefined
    : pythonHas(python, ['torch', 'transformers', 'peft', 'trl', 'datasets', 'accelerate']);
const skip =
  python === undefined
    ? 'no Python found (set WEBTUNE_PYTHON, or run bash tools/setup-python.sh)'
    : probe?.ok
      ? undefined
      : (probe as { reason: string }).reason;
if (skip !== undefined) console.warn(`job.node.test.ts: the train.py checks are skipped: ${skip}`);

interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runPython(args: string[], cwd: string, home: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(python as string, args, {
      cwd,
      env: {
        ...process.env,
        HF_HOME: home,
        HF_HUB_OFFLINE: '1',
        HF_DATASETS_OFFLINE: '1',
        TRANSFORMERS_OFFLINE: '1',
        CUDA_VISIBLE_DEVICES: '',
        OMP_NUM_THREADS: '2',
        TOKENIZERS_PARALLELISM: 'false',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const explain = (r: Ran) =>
  `exit ${r.code}\n--- stdout\n${r.stdout.slice(-3000)}\n--- stderr\n${r.stderr.slice(-3000)}`;

describe.skipIf(skip !== undefined)('train.py under Python with TRL', () => {
  let dir = '';
  let home = '';
  let job: TrainingJobJson;
  const input = jobInput();

  /** Unzips the job into a fresh folder; `edit` may change job.json first. */
  function unpack(name: string, edit?: (job: Record<string, Record<string, unknown>>) => void): string {
    const out = join(dir, name);
    for (const [path, bytes] of Object.entries(unzipSync(buildTrainingJob(input)))) {
      mkdirSync(dirname(join(out, path)), { recursive: true });
      writeFileSync(join(out, path), bytes);
    }
    if (edit) {
      const j = JSON.parse(readFileSync(join(out, 'job.json'), 'utf8'));
      edit(j);
      writeFileSync(join(out, 'job.json'), JSON.stringify(j));
    }
    return out;
  }

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'webtune-job-'));
    home = join(dir, 'hf-home');
    job = JSON.parse(readFileSync(join(unpack('job'), 'job.json'), 'utf8'));
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('--help works with no GPU, network or model', async () => {
    const r = await runPython(['train.py', '--help'], join(dir, 'job'), home);
    expect(r.code, explain(r)).toBe(0);
    for (const flag of ['--dry-run', '--fresh', '--base-model', '--output-dir', '--max-steps', '--epochs', '--bf16']) {
      expect(r.stdout).toContain(flag);
    }
  });

  it('--dry-run builds LoraConfig and SFTConfig with job.json settings, and reads the data', async () => {
    const r = await runPython(['train.py', '--dry-run'], join(dir, 'job'), home);
    expect(r.code, explain(r)).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.base_model).toBe(input.baseModel.id);
    // PEFT holds a list of targets as a set; the dry run prints it sorted.
    expect(out.lora_config).toEqual({ ...job.lora, target_modules: [...(job.lora.target_modules as string[])].sort() });
    expect(out.sft_config).toEqual({
      ...job.training,
      optim: 'adamw_torch',
      packing: false,
      eval_strategy: 'steps',
      save_strategy: 'steps',
      bf16: false,
    });
    expect(out.data).toEqual({
      train: { rows: job.data.train_examples, columns: ['input_ids', 'labels'] },
      validation: { rows: job.data.validation_examples, columns: ['input_ids', 'labels'] },
    });
  }, 300_000);

  it('continues the adapter for two steps on the tiny-llama fixture; webtune reads the adapter it writes', async () => {
    const r = await runPython(
      ['train.py', '--base-model', TINY_LLAMA, '--max-steps', '2', '--output-dir', 'out'],
      join(dir, 'job'),
      home,
    );
    expect(r.code, explain(r)).toBe(0);
    expect(r.stdout).toContain('adapter written to out');
    const out = join(dir, 'job', 'out');
    const imported = importPeftAdapter(
      {
        config: readFileSync(join(out, ADAPTER_CONFIG_FILE), 'utf8'),
        safetensors: new Uint8Array(readFileSync(join(out, ADAPTER_WEIGHTS_FILE))),
      },
      namedModules(TINY_LLAMA_CONFIG),
      'llama',
    );
    expect(imported.resolved.modules.map((m) => m.name)).toEqual(job.adapter.modules);
    expect(imported.resolved.config.r).toBe(job.lora.r);
    // lora_B starts at zero (init_lora_weights true); a trained adapter's is not.
    const b = imported.weights.get(job.adapter.modules[0] as string)?.b;
    expect(b?.some((v) => v !== 0)).toBe(true);
  }, 300_000);

  it('a job.json that lacks a setting is a clear error before anything loads', async () => {
    const bad = unpack('bad', (j) => {
      delete j.training?.max_steps;
      delete j.lora?.r;
    });
    const r = await runPython(['train.py', '--dry-run'], bad, home);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('lacks lora.r, training.max_steps');
  });

  it('stops when TRL would not train on the rows as written (here: truncated by a shorter max_length)', async () => {
    const short = unpack('short', (j) => {
      (j.training as Record<string, unknown>).max_length = 4;
    });
    const r = await runPython(['train.py', '--base-model', TINY_LLAMA, '--fresh'], short, home);
    expect(r.code).not.toBe(0);
    expect(r.stderr, explain(r)).toContain('SFTTrainer changed the train data');
  }, 300_000);
});
