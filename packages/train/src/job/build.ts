/**
 * A training job as a zip, for continuing a webtune run on a cluster with Hugging Face TRL + PEFT:
 *
 *   job.json                       every setting (config.ts)
 *   train.py, requirements.txt     the script (kept as a .py file in this folder, imported as text)
 *   README.md                      what the job is and the two commands
 *   adapter/adapter_config.json    the adapter, unchanged
 *   adapter/adapter_model.safetensors
 *   data/train.jsonl               the tokenized examples (data.ts)
 *   data/validation.jsonl          when the run had a validation split
 *
 * Everything is checked before the first byte is written; a bad input is a TrainingJobError.
 */
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, type ResolvedLora } from '../lora/index.js';
import type { AdapterFiles } from '../store/types.js';
import { readJobAdapter } from './adapter.js';
import { type JobBaseModel, type JobTrainingConfig, type TrainingJobJson, trainingJobJson } from './config.js';
import { JOB_TRAIN_FILE, JOB_VALIDATION_FILE, type JobData, jsonlChunks, summariseData } from './data.js';
import { TrainingJobError } from './errors.js';
import readmeBody from './job-readme.md?raw';
import requirements from './requirements.txt?raw';
import trainPy from './train.py?raw';
import { type ZipEntry, zipEntries } from './zip.js';

export const JOB_FILE = 'job.json';
export const JOB_SCRIPT_FILE = 'train.py';
export const JOB_REQUIREMENTS_FILE = 'requirements.txt';
export const JOB_README_FILE = 'README.md';
export const JOB_ADAPTER_DIR = 'adapter';

export interface TrainingJobInput {
  /** The adapter's name: names the job. */
  readonly name: string;
  /** Its PEFT files (what the adapter library stores and exports). */
  readonly adapter: AdapterFiles;
  /** The adapter as the trainer resolved it on the base model, when known: the config and every
   * module's shape are checked against it. Without it the modules come from the weights file. */
  readonly resolved?: ResolvedLora;
  readonly baseModel: JobBaseModel;
  /** The run's settings (a RunConfig fits). */
  readonly training: JobTrainingConfig;
  /** The examples it trained on. */
  readonly data: JobData;
  /** Optimizer steps the adapter has been trained for. Default 0. */
  readonly stepsTrained?: number;
  /** The export time (job.json's `created` and every entry's time in the zip). Default: now. */
  readonly created?: Date;
}

/** job.json for `input` (what buildTrainingJob writes), after every check. */
export function trainingJobConfig(input: TrainingJobInput): TrainingJobJson {
  if (typeof input.name !== 'string' || input.name.trim() === '') throw new TrainingJobError('name', 'is empty');
  const stepsTrained = input.stepsTrained ?? 0;
  if (!Number.isSafeInteger(stepsTrained) || stepsTrained < 0) {
    throw new TrainingJobError('stepsTrained', `must be an integer >= 0, got ${stepsTrained}`);
  }
  return trainingJobJson({
    name: input.name,
    created: input.created ?? new Date(),
    baseModel: input.baseModel,
    adapter: readJobAdapter(input.adapter, input.baseModel.modelType, input.resolved),
    adapterPath: JOB_ADAPTER_DIR,
    stepsTrained,
    training: input.training,
    data: summariseData(input.data),
  });
}

function describeTargets(t: TrainingJobJson['lora']['target_modules']): string {
  return typeof t === 'string' ? `regex ${JSON.stringify(t)}` : t.join(', ');
}

/** README.md: the job's facts, then the fixed text (job-readme.md). */
export function jobReadme(job: TrainingJobJson): string {
  const { lora: l, training: t, data: d } = job;
  const scale = l.use_rslora ? 'alpha / sqrt(r) (rsLoRA)' : 'alpha / r';
  const validation = d.validation === null ? 'no validation split' : `${d.validation_examples} validation examples`;
  // transformers' (and webtune's) 'constant' schedule has no warmup, whatever warmup_steps says.
  const warmup = t.lr_scheduler_type === 'constant' ? 'no warmup' : `${t.warmup_steps} warmup steps`;
  const lines = [
    `# ${job.name}: a webtune training job`,
    '',
    `Continues training the LoRA adapter "${job.name}" with Hugging Face TRL + PEFT on a machine with GPUs.`,
    '',
    `- Base model: \`${job.base_model.name_or_path}\` (${job.base_model.architecture ?? job.base_model.model_type})`,
    `- LoRA: r ${l.r}, alpha ${l.lora_alpha}, scale ${scale}, on ${job.adapter.modules.length} modules (${describeTargets(l.target_modules)}); trained ${job.adapter.steps_trained} steps in webtune`,
    `- Data: ${d.train_examples} training examples (${d.train_tokens} tokens, ${d.train_trained_tokens} with loss), ${validation}, at most ${t.max_length} tokens each`,
    `- Training: ${t.max_steps} steps of ${t.per_device_train_batch_size} x ${t.gradient_accumulation_steps} sequences, AdamW lr ${t.learning_rate}, ${t.lr_scheduler_type} schedule, ${warmup}, seed ${t.seed}`,
    '',
  ];
  return `${lines.join('\n')}${readmeBody}`;
}

/** The job zip (module header). */
export function buildTrainingJob(input: TrainingJobInput): Uint8Array {
  const created = input.created ?? new Date();
  const job = trainingJobConfig({ ...input, created });
  const text = (s: string) => [new TextEncoder().encode(s)];
  const entries: ZipEntry[] = [
    { path: JOB_README_FILE, chunks: text(jobReadme(job)) },
    { path: JOB_FILE, chunks: text(`${JSON.stringify(job, null, 2)}\n`) },
    { path: JOB_SCRIPT_FILE, chunks: text(trainPy) },
    { path: JOB_REQUIREMENTS_FILE, chunks: text(requirements) },
    { path: `${JOB_ADAPTER_DIR}/${ADAPTER_CONFIG_FILE}`, chunks: text(input.adapter.config) },
    { path: `${JOB_ADAPTER_DIR}/${ADAPTER_WEIGHTS_FILE}`, chunks: [input.adapter.weights], store: true },
    { path: JOB_TRAIN_FILE, chunks: jsonlChunks(input.data.train) },
  ];
  if (job.data.validation !== null) {
    entries.push({ path: JOB_VALIDATION_FILE, chunks: jsonlChunks(input.data.validation ?? []) });
  }
  return zipEntries(entries, created);
}
