// Inputs for the training-job tests: an adapter for the tiny-llama fixture made by webtune's own
// LoRA code (resolved targets, seeded init, PEFT export), examples with the loss masks the data
// pipeline produces (prompt masked, several masked spans, none masked), and a run's settings.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { namedModules, parseModelConfig } from '@webtune/models';
import type { Example } from '../src/data/index.js';
import type { JobTrainingConfig, TrainingJobInput } from '../src/job/index.js';
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  exportPeftAdapter,
  initLoraWeights,
  type LoraConfigInput,
  type ResolvedLora,
  resolveLoraTargets,
  validateLoraConfig,
} from '../src/lora/index.js';
import { Rng } from '../src/random.js';

export const TINY_LLAMA = fileURLToPath(new URL('../../models/test/fixtures/tiny-llama/', import.meta.url));
const modelJson = JSON.parse(readFileSync(`${TINY_LLAMA}config.json`, 'utf8'));
export const TINY_LLAMA_CONFIG = parseModelConfig(modelJson);
export const TINY_LLAMA_ID = 'webtune-fixtures/tiny-llama';

export function tinyLlamaAdapter(
  lora: LoraConfigInput,
  seed = 1,
): { resolved: ResolvedLora; config: string; weights: Uint8Array } {
  const resolved = resolveLoraTargets(validateLoraConfig(lora), namedModules(TINY_LLAMA_CONFIG), 'llama');
  const files = exportPeftAdapter(resolved, initLoraWeights(resolved, seed), { baseModelNameOrPath: TINY_LLAMA_ID });
  return { resolved, config: files[ADAPTER_CONFIG_FILE], weights: files[ADAPTER_WEIGHTS_FILE] };
}

/** `count` examples of 3..seq tokens (ids below the fixture's vocabulary of 512), masks varied by index. */
export function examples(count: number, seq: number, seed: number): Example[] {
  const rng = new Rng(seed, 'job-examples');
  return Array.from({ length: count }, (_, i) => {
    const n = 3 + Math.floor(rng.uniform() * (seq - 2));
    const inputIds = Int32Array.from({ length: n }, () => Math.floor(rng.uniform() * 512));
    const labels = inputIds.slice();
    if (i % 3 === 1) labels.fill(-100, 0, Math.floor(n / 2)); // a prompt
    if (i % 3 === 2) {
      // alternating turns: user spans masked, assistant spans trained
      for (let t = 0; t < n; t++) if (Math.floor(t / 2) % 2 === 0) labels[t] = -100;
      labels[n - 1] = inputIds[n - 1] as number;
    }
    return { inputIds, labels, format: 'prompt-completion', line: i + 1 };
  });
}

export const TRAINING: JobTrainingConfig = {
  optimizer: { lr: 3e-4, beta1: 0.85, beta2: 0.995, eps: 1e-7, weightDecay: 0.05, maxGradNorm: 0.5 },
  schedule: { kind: 'cosine', warmupSteps: 3 },
  totalSteps: 40,
  epochs: 2.5,
  batch: 2,
  seq: 16,
  gradAccum: 3,
  seed: 7,
  checkpointEvery: 10,
  evalEvery: 5,
  recompute: true,
};

export function jobInput(overrides: Partial<TrainingJobInput> = {}): TrainingJobInput {
  const adapter = tinyLlamaAdapter({ r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj'] });
  return {
    name: 'tiny-job',
    adapter: { config: adapter.config, weights: adapter.weights },
    resolved: adapter.resolved,
    baseModel: { id: TINY_LLAMA_ID, modelType: 'llama', architecture: 'LlamaForCausalLM' },
    training: TRAINING,
    data: { train: examples(12, 16, 1), validation: examples(3, 16, 2) },
    stepsTrained: 40,
    created: new Date(Date.UTC(2026, 0, 2, 3, 4, 6)),
    ...overrides,
  };
}
