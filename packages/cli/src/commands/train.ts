import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { formatBytes, type LrScheduleKind } from '@webtune/core';
import {
  DataLoader,
  estimateMemory,
  estimateTraining,
  LoraTrainer,
  padIdOf,
  prepareDataset,
  splitHeldOut,
} from '@webtune/train';
import { type FlagSpec, parseFlags, UsageError } from '../args.js';
import { gpu, info, openModel, precisionFlag, userPath } from '../common.js';

export const trainFlags: Record<string, FlagSpec> = {
  model: { type: 'string', description: 'Hugging Face model folder', required: true },
  data: {
    type: 'string',
    description: 'training data: plain text, or .jsonl with {"text"}, {"prompt","completion"} or {"messages"}',
    required: true,
  },
  out: { type: 'string', description: 'folder to write the PEFT adapter into', required: true },
  format: { type: 'string', description: 'text or jsonl (default: from the file name)' },
  rank: { type: 'int', description: 'LoRA rank r', default: 8 },
  alpha: { type: 'number', description: 'lora_alpha (default 2·rank)' },
  targets: {
    type: 'string',
    description: 'comma-separated module names, or all-linear (default: PEFT’s for the model)',
  },
  rslora: { type: 'boolean', description: 'scale by alpha/√r (rsLoRA)', default: false },
  lr: { type: 'number', description: 'peak learning rate', default: 1e-3 },
  steps: { type: 'int', description: 'optimizer steps (default: one epoch)' },
  epochs: { type: 'number', description: 'passes over the data (instead of --steps)' },
  batch: { type: 'int', description: 'sequences per micro-batch', default: 4 },
  seq: { type: 'int', description: 'tokens per sequence', default: 128 },
  'grad-accum': { type: 'int', description: 'micro-batches per optimizer step', default: 1 },
  warmup: { type: 'int', description: 'warmup steps', default: 0 },
  schedule: { type: 'string', description: 'constant, linear or cosine', default: 'linear' },
  'weight-decay': { type: 'number', description: 'AdamW weight decay', default: 0.01 },
  'max-grad-norm': { type: 'number', description: 'gradient clipping (0 = off)', default: 1 },
  seed: { type: 'int', description: 'seed for the adapter init and the data order', default: 0 },
  'held-out': {
    type: 'number',
    description: 'fraction of the data kept out for evaluation before and after',
    default: 0,
  },
  precision: { type: 'string', description: 'frozen weights on the GPU: f16 or f32', default: 'f16' },
  recompute: {
    type: 'boolean',
    description: 'recompute activations in the backward (less memory, ~1/3 more time)',
    default: false,
  },
};

function schedule(kind: string): LrScheduleKind {
  if (kind !== 'constant' && kind !== 'linear' && kind !== 'cosine')
    throw new UsageError(`train: --schedule must be constant, linear or cosine, got ${kind}`);
  return kind;
}

function eta(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const m = Math.floor(seconds / 60);
  return m > 0 ? `${m}m${Math.round(seconds % 60)}s` : `${seconds.toFixed(0)}s`;
}

export async function train(argv: string[]): Promise<void> {
  const f = parseFlags(argv, trainFlags, 'train');
  if (f.steps !== undefined && f.epochs !== undefined)
    throw new UsageError('train: give --steps or --epochs, not both');
  const format = f.format as string | undefined;
  if (format !== undefined && format !== 'text' && format !== 'jsonl')
    throw new UsageError(`train: --format must be text or jsonl, got ${format}`);
  const kind = schedule(f.schedule as string);
  const dataPath = userPath(f.data as string);
  const outDir = userPath(f.out as string);
  const content = await readFile(dataPath, 'utf8');
  const ctx = await gpu();
  const { model, tokenizer } = await openModel(ctx, f.model as string, precisionFlag(f.precision));
  const seq = f.seq as number;
  const batch = f.batch as number;
  const gradAccum = f['grad-accum'] as number;
  const dataset = prepareDataset(tokenizer, content, {
    file: basename(dataPath),
    seq,
    format: format as 'text' | 'jsonl' | undefined,
  });
  const split =
    (f['held-out'] as number) > 0
      ? splitHeldOut(dataset.examples, { lastFraction: f['held-out'] as number })
      : { train: dataset.examples, heldOut: [] };
  if (split.train.length === 0) throw new UsageError('train: no training examples left after the held-out split');
  const s = dataset.stats;
  info(
    `data: ${s.examples} examples (${dataset.format}), ${s.tokens} tokens, ${s.trainedTokens} trained${s.truncated ? `, ${s.truncated} truncated to ${seq}` : ''}${split.heldOut.length ? `; ${split.heldOut.length} held out` : ''}`,
  );
  const plan = estimateTraining(
    { ...s, examples: split.train.length },
    {
      batch,
      seq,
      gradAccum,
      ...(f.steps !== undefined ? { steps: f.steps as number } : { epochs: (f.epochs as number | undefined) ?? 1 }),
    },
  );
  const steps = plan.steps;
  const rank = f.rank as number;
  const targets = f.targets as string | undefined;
  const lora = {
    r: rank,
    lora_alpha: (f.alpha as number | undefined) ?? 2 * rank,
    target_modules:
      targets === undefined
        ? null
        : targets === 'all-linear'
          ? 'all-linear'
          : targets
              .split(',')
              .map((t) => t.trim())
              .filter(Boolean),
    use_rslora: f.rslora as boolean,
    lora_dropout: 0,
  };
  const maxGradNorm = f['max-grad-norm'] as number;
  // The plan's memory, shown before anything is allocated (the trainer checks it against the device).
  const est = estimateMemory(model.config, lora, {
    batch,
    seq,
    gradAccum,
    recompute: f.recompute as boolean,
    precision: model.precision,
    device: ctx,
  });
  info(
    `GPU memory planned: weights ${formatBytes(est.frozenWeights)}, adapter + optimizer ${formatBytes(est.trainable)}, activations ${formatBytes(est.activations)}, scratch ${formatBytes(est.scratch)}; total ${formatBytes(est.total)} (largest buffer ${formatBytes(est.largestBuffer.bytes)})`,
  );
  const trainer = await LoraTrainer.create(ctx, model, {
    lora,
    batch,
    seq,
    gradAccum,
    seed: f.seed as number,
    recompute: f.recompute as boolean,
    optimizer: {
      lr: f.lr as number,
      weightDecay: f['weight-decay'] as number,
      maxGradNorm: maxGradNorm > 0 ? maxGradNorm : Infinity,
    },
    schedule: { kind, warmupSteps: f.warmup as number, totalSteps: steps },
  });
  const mem = trainer.memory;
  const trainable = trainer.resolved.modules.reduce((n, m) => n + m.r * (m.inFeatures + m.outFeatures), 0);
  info(
    `LoRA: ${trainer.resolved.modules.length} modules, ${trainable.toLocaleString('en-US')} trainable parameters (r ${rank}, alpha ${lora.lora_alpha}${lora.use_rslora ? ', rsLoRA' : ''})`,
  );
  info(`GPU memory allocated: ${formatBytes(mem.total)}`);
  info(`training ${steps} steps of ${gradAccum}×${batch}×${seq} tokens, lr ${f.lr} (${kind}, warmup ${f.warmup})`);

  if (split.heldOut.length) info(`held-out loss before: ${(await trainer.evaluate(split.heldOut)).loss.toFixed(4)}`);
  const loader = new DataLoader(split.train, { batch, seq, padId: padIdOf(tokenizer), seed: f.seed as number });
  const t0 = performance.now();
  let tokens = 0;
  for (let step = 1; step <= steps; step++) {
    const micro = [];
    for (let k = 0; k < gradAccum; k++) {
      const b = loader.next();
      if (!b) break;
      micro.push({ inputIds: b.inputIds, labels: b.labels });
    }
    const r = await trainer.trainStep(micro);
    tokens += r.positions;
    const elapsed = (performance.now() - t0) / 1000;
    info(
      `step ${r.step}/${steps}  loss ${r.loss.toFixed(4)}  lr ${r.lr.toExponential(2)}  grad norm ${r.gradNorm.toFixed(3)}  ${(tokens / elapsed).toFixed(0)} tokens/s  ETA ${eta((elapsed / step) * (steps - step))}`,
    );
  }
  if (split.heldOut.length) info(`held-out loss after: ${(await trainer.evaluate(split.heldOut)).loss.toFixed(4)}`);
  const files = await trainer.exportPeft({ baseModelNameOrPath: f.model as string });
  // Write beside the target and rename, so an interruption never leaves a half-written adapter.
  const tmp = `${outDir}.partial-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  for (const [name, data] of Object.entries(files)) await writeFile(join(tmp, name), data);
  await rm(outDir, { recursive: true, force: true });
  await rename(tmp, outDir);
  info(`adapter written to ${outDir} (adapter_config.json, adapter_model.safetensors)`);
  trainer.dispose();
  model.dispose();
  ctx.destroy();
}
