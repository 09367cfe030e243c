// The training-job zip (src/job): its entries and their bytes, job.json against the LoraConfig /
// ResolvedLora and run settings it was made from (every field), the JSONL against the examples
// (ids and masks exactly), and the errors for inputs the job script could not run from.
import { readFileSync } from 'node:fs';
import { serializeSafetensors } from '@webtune/models';
import { strFromU8, unzipSync } from 'fflate';
import { describe, expect, it } from 'vitest';
import type { Example } from '../src/data/index.js';
import {
  buildTrainingJob,
  jobReadme,
  jsonlChunks,
  TrainingJobError,
  type TrainingJobInput,
  type TrainingJobJson,
  trainingJobConfig,
} from '../src/job/index.js';
import { examples, jobInput, TINY_LLAMA_ID, TRAINING, tinyLlamaAdapter } from './job-fixture.js';

const unzip = (zip: Uint8Array) => unzipSync(zip);
const text = (files: Record<string, Uint8Array>, name: string) => {
  const file = files[name];
  if (file === undefined) throw new Error(`${name} is not in the zip`);
  return strFromU8(file);
};
const jobOf = (files: Record<string, Uint8Array>): TrainingJobJson => JSON.parse(text(files, 'job.json'));
const jsonl = (files: Record<string, Uint8Array>, name: string) =>
  text(files, name)
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as { input_ids: number[]; labels: number[] });

function caught(fn: () => unknown): TrainingJobError {
  try {
    fn();
  } catch (error) {
    if (error instanceof TrainingJobError) return error;
    throw error;
  }
  throw new Error('expected a TrainingJobError');
}

/** adapter_config.json of the default input, edited. */
function editedConfig(edit: (c: Record<string, unknown>) => void): string {
  const c = JSON.parse(jobInput().adapter.config);
  edit(c);
  return JSON.stringify(c, null, 2);
}

describe('buildTrainingJob: the zip', () => {
  const input = jobInput();
  const files = unzip(buildTrainingJob(input));

  it('holds the job, the script, the adapter and both data splits', () => {
    expect(Object.keys(files).sort()).toEqual([
      'README.md',
      'adapter/adapter_config.json',
      'adapter/adapter_model.safetensors',
      'data/train.jsonl',
      'data/validation.jsonl',
      'job.json',
      'requirements.txt',
      'train.py',
    ]);
  });

  it('carries the adapter files unchanged', () => {
    expect(text(files, 'adapter/adapter_config.json')).toBe(input.adapter.config);
    expect(files['adapter/adapter_model.safetensors']).toEqual(input.adapter.weights);
  });

  it('carries train.py and requirements.txt as they are in the repository', () => {
    expect(text(files, 'train.py')).toBe(readFileSync(new URL('../src/job/train.py', import.meta.url), 'utf8'));
    expect(text(files, 'requirements.txt')).toMatch(/^trl>=/m);
  });

  it('has a README with the facts of the job and the two commands', () => {
    const readme = text(files, 'README.md');
    expect(readme).toMatch(/^# tiny-job: a webtune training job/);
    expect(readme).toContain('pip install -r requirements.txt');
    expect(readme).toContain('accelerate launch train.py');
    expect(readme).toContain(`\`${TINY_LLAMA_ID}\``);
    expect(readme).toContain('r 4, alpha 8');
    expect(readme).toContain('40 steps of 2 x 3 sequences, AdamW lr 0.0003, cosine schedule, 3 warmup steps, seed 7');
  });

  it('writes data files that reproduce the examples exactly: ids and loss masks', () => {
    for (const [name, split] of [
      ['data/train.jsonl', input.data.train],
      ['data/validation.jsonl', input.data.validation ?? []],
    ] as const) {
      const rows = jsonl(files, name);
      expect(rows.length).toBe(split.length);
      rows.forEach((row, i) => {
        const e = split[i] as Example;
        expect(Object.keys(row)).toEqual(['input_ids', 'labels']);
        expect(row.input_ids).toEqual([...e.inputIds]);
        expect(row.labels).toEqual([...e.labels]);
      });
    }
    // The fixture covers the masks the pipeline makes: none, a prompt, several spans.
    const masks = input.data.train.map((e) => [...e.labels].map((l) => (l === -100 ? 0 : 1)).join(''));
    expect(masks.some((m) => !m.includes('0'))).toBe(true);
    expect(masks.some((m) => /^0+1+$/.test(m))).toBe(true);
    expect(masks.some((m) => /1+0+1/.test(m))).toBe(true);
  });

  it('gives the same bytes for the same input', () => {
    expect(buildTrainingJob(input)).toEqual(buildTrainingJob(input));
  });

  it('leaves the validation file out when there is no validation split', () => {
    const noValidation = unzip(buildTrainingJob(jobInput({ data: { train: examples(5, 16, 3) } })));
    expect(noValidation['data/validation.jsonl']).toBeUndefined();
    const job = jobOf(noValidation);
    expect(job.data.validation).toBeNull();
    expect(job.data.validation_examples).toBe(0);
  });

  it('streams large data in chunks that join to the same text', () => {
    const many = examples(200, 16, 4);
    const chunks = [...jsonlChunks(many, 1000)];
    expect(chunks.length).toBeGreaterThan(5);
    const joined = chunks.map((c) => strFromU8(c)).join('');
    expect(joined).toBe([...jsonlChunks(many)].map((c) => strFromU8(c)).join(''));
    const zipped = unzip(buildTrainingJob(jobInput({ data: { train: many } })));
    expect(text(zipped, 'data/train.jsonl')).toBe(joined);
  });
});

describe('job.json', () => {
  it('states every setting: base model, adapter, LoRA config (as resolved) and TrainingArguments', () => {
    const input = jobInput();
    const job = jobOf(unzip(buildTrainingJob(input)));
    const c = input.resolved?.config;
    if (c === undefined) throw new Error('the fixture has a resolved adapter');
    expect(job).toEqual({
      format: 'webtune-training-job',
      version: 1,
      name: 'tiny-job',
      created: '2026-01-02T03:04:06.000Z',
      base_model: {
        name_or_path: TINY_LLAMA_ID,
        model_type: 'llama',
        architecture: 'LlamaForCausalLM',
        revision: null,
      },
      adapter: {
        path: 'adapter',
        steps_trained: 40,
        modules: input.resolved?.modules.map((m) => m.name),
      },
      lora: {
        r: c.r,
        lora_alpha: c.lora_alpha,
        lora_dropout: c.lora_dropout,
        target_modules: [...(c.target_modules as string[])],
        use_rslora: c.use_rslora,
        init_lora_weights: c.init_lora_weights,
        rank_pattern: {},
        alpha_pattern: {},
        layers_to_transform: null,
        layers_pattern: null,
        bias: 'none',
        fan_in_fan_out: false,
        task_type: 'CAUSAL_LM',
      },
      training: {
        learning_rate: 3e-4,
        adam_beta1: 0.85,
        adam_beta2: 0.995,
        adam_epsilon: 1e-7,
        weight_decay: 0.05,
        max_grad_norm: 0.5,
        lr_scheduler_type: 'cosine',
        warmup_steps: 3,
        max_steps: 40,
        num_train_epochs: 2.5,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 3,
        max_length: 16,
        seed: 7,
        eval_steps: 5,
        save_steps: 10,
        gradient_checkpointing: true,
      },
      data: {
        train: 'data/train.jsonl',
        validation: 'data/validation.jsonl',
        columns: ['input_ids', 'labels'],
        ignore_index: -100,
        train_examples: 12,
        validation_examples: 3,
        train_tokens: input.data.train.reduce((s, e) => s + e.inputIds.length, 0),
        train_trained_tokens: input.data.train.reduce(
          (s, e) => s + [...e.labels].filter((l, t) => t > 0 && l !== -100).length,
          0,
        ),
        longest_example: Math.max(
          ...[...input.data.train, ...(input.data.validation ?? [])].map((e) => e.inputIds.length),
        ),
        fingerprint: job.data.fingerprint,
      },
    });
    expect(job.lora.target_modules).toEqual(['q_proj', 'v_proj']);
    expect(job.adapter.modules).toEqual(
      [0, 1, 2].flatMap((l) => [`model.layers.${l}.self_attn.q_proj`, `model.layers.${l}.self_attn.v_proj`]),
    );
    expect(job.data.fingerprint).toMatch(/^[0-9a-f]{8}$/);
  });

  it('carries rsLoRA, rank_pattern, alpha_pattern, all-linear targets and layers_to_transform as resolved', () => {
    const adapter = tinyLlamaAdapter({
      r: 8,
      lora_alpha: 16,
      target_modules: 'all-linear',
      use_rslora: true,
      rank_pattern: { o_proj: 2, 'layers\\.1\\.mlp\\..*': 4 },
      alpha_pattern: { down_proj: 3 },
      init_lora_weights: 'gaussian',
    });
    const job = trainingJobConfig(jobInput({ adapter, resolved: adapter.resolved }));
    const c = adapter.resolved.config;
    expect(job.lora).toMatchObject({
      r: 8,
      lora_alpha: 16,
      use_rslora: true,
      rank_pattern: { o_proj: 2, 'layers\\.1\\.mlp\\..*': 4 },
      alpha_pattern: { down_proj: 3 },
      init_lora_weights: 'gaussian',
      target_modules: [...(c.target_modules as string[])],
    });
    // 'all-linear' is expanded as PEFT saves it: every linear layer but the head.
    expect(job.lora.target_modules).toEqual([
      'down_proj',
      'gate_proj',
      'k_proj',
      'o_proj',
      'q_proj',
      'up_proj',
      'v_proj',
    ]);
    expect(job.adapter.modules).toEqual(adapter.resolved.modules.map((m) => m.name));
    expect(job.adapter.modules.length).toBe(21);

    const layers = tinyLlamaAdapter({ r: 2, target_modules: ['k_proj'], layers_to_transform: [0, 2] });
    const layered = trainingJobConfig(jobInput({ adapter: layers, resolved: layers.resolved }));
    expect(layered.lora.layers_to_transform).toEqual([0, 2]);
    expect(layered.adapter.modules).toEqual(['model.layers.0.self_attn.k_proj', 'model.layers.2.self_attn.k_proj']);
  });

  it('maps the optional and special settings: no clipping, constant schedule, defaults', () => {
    const job = trainingJobConfig(
      jobInput({
        training: {
          ...TRAINING,
          optimizer: { ...TRAINING.optimizer, maxGradNorm: null },
          // webtune's and transformers' 'constant' both ignore warmup: passed through as it is.
          schedule: { kind: 'constant', warmupSteps: 5 },
          epochs: undefined,
          checkpointEvery: undefined,
          evalEvery: undefined,
          recompute: undefined,
        },
      }),
    );
    expect(jobReadme(job)).toContain('constant schedule, no warmup');
    expect(job.training).toMatchObject({
      max_grad_norm: 0,
      lr_scheduler_type: 'constant',
      warmup_steps: 5,
      num_train_epochs: 1,
      save_steps: 0,
      eval_steps: 40,
      gradient_checkpointing: false,
    });
  });

  it('without a ResolvedLora takes the modules from the weights and fills PEFT default targets', () => {
    const input = jobInput();
    const noTargets = editedConfig((c) => {
      c.target_modules = null;
    });
    const job = trainingJobConfig({ ...input, resolved: undefined, adapter: { ...input.adapter, config: noTargets } });
    expect(job.lora.target_modules).toEqual(['q_proj', 'v_proj']);
    expect(job.adapter.modules).toEqual(input.resolved?.modules.map((m) => m.name));
  });
});

describe('buildTrainingJob: bad input', () => {
  const input = jobInput();
  const withConfig = (config: string): TrainingJobInput => ({ ...input, adapter: { ...input.adapter, config } });

  it('an adapter_config.json without peft_type or r, or not JSON', () => {
    const noType = caught(() => buildTrainingJob(withConfig(editedConfig((c) => delete c.peft_type))));
    expect(noType.item).toBe('adapter_config.json (peft_type)');
    expect(noType.message).toMatch(/peft_type.*missing/);
    const noRank = caught(() => buildTrainingJob(withConfig(editedConfig((c) => delete c.r))));
    expect(noRank.item).toBe('adapter_config.json (r)');
    expect(caught(() => buildTrainingJob(withConfig('{"peft_type": "LORA", '))).message).toMatch(/not valid JSON/);
    const dora = caught(() => buildTrainingJob(withConfig(editedConfig((c) => (c.use_dora = true)))));
    expect(dora.item).toBe('adapter_config.json (use_dora)');
  });

  it('no target_modules and no PEFT default for the model type', () => {
    const error = caught(() =>
      buildTrainingJob({
        ...withConfig(editedConfig((c) => (c.target_modules = null))),
        resolved: undefined,
        baseModel: { id: 'x/y', modelType: 'mamba' },
      }),
    );
    expect(error.item).toBe('adapter_config.json (target_modules)');
    expect(error.message).toMatch(/no default target modules for model type "mamba"/);
  });

  it('a config that is not the one the adapter was trained with', () => {
    const error = caught(() => buildTrainingJob(withConfig(editedConfig((c) => (c.lora_alpha = 32)))));
    expect(error.item).toBe('adapter_config.json (lora_alpha)');
    expect(error.message).toMatch(/is 32, but the adapter was trained with 8/);
    const rank = caught(() =>
      buildTrainingJob({ ...withConfig(editedConfig((c) => (c.r = 16))), resolved: undefined }),
    );
    expect(rank.message).toMatch(/r\): is 16, but adapter_model.safetensors holds rank 4/);
  });

  it('weights that are not LoRA pairs of the trained modules', () => {
    const tensor = (name: string, shape: [number, number]) => ({
      name,
      dtype: 'F32' as const,
      shape,
      data: new Float32Array(shape[0] * shape[1]),
    });
    const weights = (tensors: ReturnType<typeof tensor>[]) => ({
      ...input,
      adapter: { ...input.adapter, weights: serializeSafetensors(tensors) },
    });
    const q = 'base_model.model.model.layers.0.self_attn.q_proj';
    expect(
      caught(() =>
        buildTrainingJob(weights([tensor('base_model.model.model.embed_tokens.lora_embedding_A', [4, 512])])),
      ).message,
    ).toMatch(/is not a LoRA tensor/);
    expect(caught(() => buildTrainingJob(weights([tensor(`${q}.lora_A.weight`, [4, 48])]))).message).toMatch(
      /has lora_A without lora_B/,
    );
    expect(
      caught(() =>
        buildTrainingJob(weights([tensor(`${q}.lora_A.weight`, [4, 48]), tensor(`${q}.lora_B.weight`, [48, 4])])),
      ).message,
    ).toMatch(/v_proj\): has no tensors for this trained module/);
    expect(caught(() => buildTrainingJob(weights([]))).message).toMatch(/holds no LoRA tensors/);
    const garbage = { ...input, adapter: { ...input.adapter, weights: new Uint8Array([1, 2, 3]) } };
    expect(caught(() => buildTrainingJob(garbage)).item).toBe('adapter_model.safetensors');
  });

  it('data the settings do not fit, or no data', () => {
    const long = examples(2, 16, 5);
    long.push({ inputIds: new Int32Array(20), labels: new Int32Array(20), format: 'text' });
    expect(caught(() => buildTrainingJob({ ...input, data: { train: long } })).message).toMatch(
      /training.seq: is 16, but an example has 20 tokens/,
    );
    const ragged = examples(2, 16, 5);
    ragged.push({ inputIds: new Int32Array(4), labels: new Int32Array(3), format: 'text', line: 9 });
    expect(caught(() => buildTrainingJob({ ...input, data: { train: ragged } })).item).toBe('data.train[2] (line 9)');
    expect(caught(() => buildTrainingJob({ ...input, data: { train: [] } })).item).toBe('data.train');
  });

  it('settings with no TrainingArguments equivalent, an empty base model id', () => {
    const bad = (training: Partial<TrainingJobInput['training']>) =>
      caught(() => buildTrainingJob({ ...input, training: { ...TRAINING, ...training } })).item;
    expect(bad({ batch: 0 })).toBe('training.batch');
    expect(bad({ totalSteps: 2.5 })).toBe('training.totalSteps');
    expect(bad({ schedule: { kind: 'polynomial' as 'linear', warmupSteps: 0 } })).toBe('training.schedule.kind');
    expect(bad({ optimizer: { ...TRAINING.optimizer, lr: Number.NaN } })).toBe('training.optimizer.lr');
    expect(caught(() => buildTrainingJob({ ...input, baseModel: { id: '', modelType: 'llama' } })).item).toBe(
      'baseModel.id',
    );
  });
});
