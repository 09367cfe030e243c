/**
 * webtune train: the library's trainer (createTrainer, in this process) with its checkpoints in a
 * folder beside the output, so an interrupted run (Ctrl-C, a crash, a lost GPU) continues with
 * --resume. The finished adapter is written to --out atomically, in the PEFT layout.
 */
import { mkdir, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { formatBytes } from '@webtune/core';
import { isGgufFileName } from '@webtune/models';
import { createTrainer, type TrainConfig, type Trainer, type TrainerProgress } from '@webtune/train';
import { type FlagSpec, parseFlags, UsageError } from '../args.js';
import { info, PRECISION_HELP, precisionFlag, tileMathFlag, userPath } from '../common.js';

export const trainFlags: Record<string, FlagSpec> = {
  model: { type: 'string', description: 'Hugging Face model folder, or a .gguf file', required: true },
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
  dropout: { type: 'number', description: 'lora_dropout: probability of dropping each LoRA input', default: 0 },
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
  seed: { type: 'int', description: 'seed for the adapter init, the data order and the split', default: 0 },
  'held-out': {
    type: 'number',
    description: 'fraction of the data kept out for validation (its loss is reported as training goes)',
    default: 0,
  },
  precision: { type: 'string', description: PRECISION_HELP },
  recompute: {
    type: 'boolean',
    description: 'recompute activations in the backward (less memory, ~1/3 more time)',
    default: false,
  },
  'tile-math': {
    type: 'string',
    description:
      "f16 or f32: how the projections and attention stage and multiply their tiles (default: f16 on GPUs with shader-f16, else f32; f16 trains the backward's products under dynamic loss scaling)",
  },
  'checkpoint-every': { type: 'int', description: 'save a checkpoint every N steps (0: only on Ctrl-C)', default: 50 },
  'checkpoint-dir': { type: 'string', description: 'where checkpoints go (default: <out>.checkpoint)' },
  resume: { type: 'boolean', description: 'continue the interrupted run from its last checkpoint', default: false },
  'base-model': {
    type: 'string',
    description:
      'base_model_name_or_path to record in adapter_config.json (default: the Hub model a .gguf names, else the --model path)',
  },
};

function eta(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const m = Math.floor(seconds / 60);
  return m > 0 ? `${m}m${Math.round(seconds % 60)}s` : `${seconds.toFixed(0)}s`;
}

function report(p: TrainerProgress): void {
  switch (p.type) {
    case 'step':
      info(
        `step ${p.step}/${p.totalSteps}  loss ${p.loss.toFixed(4)}  lr ${p.lr.toExponential(2)}  ${p.overflow ? `gradients overflowed at loss scale ${p.lossScale}: update skipped, scale lowered` : `grad norm ${p.gradNorm.toFixed(3)}`}  ${p.tokensPerSecond.toFixed(0)} tokens/s  ETA ${eta(p.etaSeconds)}`,
      );
      break;
    case 'eval':
      info(`step ${p.step}: validation loss ${p.validationLoss.toFixed(4)}`);
      break;
    case 'checkpoint':
      info(`checkpoint saved at step ${p.step}`);
      break;
    case 'recovered':
      info(`the GPU device was lost (${p.reason}); continuing from the checkpoint of step ${p.step}`);
      break;
    case 'tokenize':
      break;
    default:
      break;
  }
}

function config(f: Record<string, unknown>, name: string): TrainConfig {
  const kind = f.schedule as string;
  if (kind !== 'constant' && kind !== 'linear' && kind !== 'cosine')
    throw new UsageError(`train: --schedule must be constant, linear or cosine, got ${kind}`);
  const targets = f.targets as string | undefined;
  const rank = f.rank as number;
  const maxGradNorm = f['max-grad-norm'] as number;
  return {
    name,
    overwrite: true,
    lora: {
      rank,
      alpha: (f.alpha as number | undefined) ?? 2 * rank,
      ...(targets === undefined
        ? {}
        : {
            targets:
              targets === 'all-linear'
                ? 'all-linear'
                : targets
                    .split(',')
                    .map((t) => t.trim())
                    .filter(Boolean),
          }),
      rsLoRA: f.rslora as boolean,
      dropout: f.dropout as number,
    },
    optimizer: {
      lr: f.lr as number,
      weightDecay: f['weight-decay'] as number,
      maxGradNorm: maxGradNorm > 0 ? maxGradNorm : null,
    },
    schedule: { kind, warmupSteps: f.warmup as number },
    ...(f.steps !== undefined ? { steps: f.steps as number } : { epochs: (f.epochs as number | undefined) ?? 1 }),
    batch: f.batch as number,
    seq: f.seq as number,
    gradAccum: f['grad-accum'] as number,
    seed: f.seed as number,
    checkpointEvery: f['checkpoint-every'] as number,
    recompute: f.recompute as boolean,
    ...tileMathFlag(f['tile-math']),
  };
}

/** Writes the adapter's files beside the target and renames, so no half-written folder remains. */
async function writeAdapter(trainer: Trainer, name: string, outDir: string): Promise<void> {
  const files = await trainer.adapters.export(name);
  const tmp = `${outDir}.partial-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  for (const [file, blob] of Object.entries(files))
    await writeFile(join(tmp, file), new Uint8Array(await blob.arrayBuffer()));
  await rm(outDir, { recursive: true, force: true });
  await rename(tmp, outDir);
}

export async function train(argv: string[]): Promise<number> {
  const f = parseFlags(argv, trainFlags, 'train');
  if (f.steps !== undefined && f.epochs !== undefined)
    throw new UsageError('train: give --steps or --epochs, not both');
  const format = f.format as string | undefined;
  if (format !== undefined && format !== 'text' && format !== 'jsonl')
    throw new UsageError(`train: --format must be text or jsonl, got ${format}`);
  const outDir = userPath(f.out as string);
  const checkpointDir = userPath((f['checkpoint-dir'] as string | undefined) ?? `${outDir}.checkpoint`);
  const name = basename(outDir);
  const trainer = await createTrainer({ worker: false, storage: { directory: checkpointDir } });
  // Ctrl-C: stop after the current step with a checkpoint, then exit.
  let interrupted = false;
  const onInterrupt = () => {
    if (interrupted) process.exit(130);
    interrupted = true;
    info('interrupted: saving a checkpoint after the current step (Ctrl-C again to quit at once)');
    void trainer.dispose();
  };
  process.on('SIGINT', onInterrupt);
  try {
    const device = await trainer.device();
    info(`GPU: ${device.description}${device.software ? ' (a software driver: slow)' : ''}`);
    const modelPath = userPath(f.model as string);
    const precision = precisionFlag(f.precision);
    // base_model_name_or_path: --base-model, else what a GGUF file names, else the folder as given.
    const id = (f['base-model'] as string | undefined) ?? (isGgufFileName(modelPath) ? undefined : (f.model as string));
    const model = await trainer.loadModel(modelPath, {
      ...(precision ? { precision } : {}),
      ...(id !== undefined ? { id } : {}),
    });
    info(
      `model: ${model.architecture}, ${model.layers} layers, ${model.parameters.toLocaleString('en-US')} parameters, ${formatBytes(model.bytes)} of ${model.precision} weights on the GPU`,
    );
    const heldOut = f['held-out'] as number;
    const stats = await trainer.loadDataset(
      { path: userPath(f.data as string) },
      {
        seq: f.seq as number,
        ...(format ? { format: format as 'text' | 'jsonl' } : {}),
        ...(heldOut > 0 ? { validation: heldOut, seed: f.seed as number } : {}),
      },
    );
    info(
      `data: ${stats.examples} examples (${stats.format}), ${stats.tokens} tokens, ${stats.trainedTokens} trained${stats.truncated ? `, ${stats.truncated} truncated to ${stats.seq}` : ''}${stats.validation ? `; ${stats.validation} held out for validation` : ''}`,
    );
    const saved = (await trainer.listCheckpoints()).find((c) => c.name === name);
    let run: Awaited<ReturnType<Trainer['resumeTraining']>>;
    if (f.resume) {
      if (!saved) throw new UsageError(`train: --resume: no checkpoint of ${name} in ${checkpointDir}`);
      info(`resuming at step ${saved.step} of ${saved.totalSteps} from ${checkpointDir}`);
      run = await trainer.resumeTraining(name, { onProgress: report });
    } else {
      if (saved)
        throw new UsageError(
          `train: ${checkpointDir} holds the checkpoint of an interrupted run (step ${saved.step} of ${saved.totalSteps}): continue it with --resume, or delete that folder to start over`,
        );
      const cfg = config(f, name);
      const plan = await trainer.plan(cfg);
      const m = plan.memory;
      info(
        `GPU memory planned: weights ${formatBytes(m.frozenWeights)}, adapter + optimizer ${formatBytes(m.trainable)}, activations ${formatBytes(m.activations)}, scratch ${formatBytes(m.scratch)}; total ${formatBytes(m.total)} (largest buffer ${formatBytes(m.largestBuffer.bytes)})`,
      );
      if (!plan.fits) throw new UsageError(`train: this configuration does not fit the GPU: ${plan.problem}`);
      info(
        `LoRA: ${plan.adaptedModules} modules, ${plan.trainableParameters.toLocaleString('en-US')} trainable parameters; ${plan.totalSteps} steps of ${plan.tokensPerStep} tokens`,
      );
      run = trainer.train(cfg, { onProgress: report });
    }
    const result = await run.done;
    if (result.status !== 'completed') {
      info(`stopped at step ${result.steps} of ${result.totalSteps}; continue with the same command and --resume`);
      return 130;
    }
    await writeAdapter(trainer, name, outDir);
    // The adapter is in --out now; the checkpoint folder held only this run.
    await trainer.adapters.delete(name);
    await rmdir(join(checkpointDir, 'adapters')).catch(() => undefined);
    await rmdir(join(checkpointDir, 'checkpoints')).catch(() => undefined);
    await rmdir(checkpointDir).catch(() => undefined);
    info(
      `trained ${result.steps} steps in ${result.seconds.toFixed(1)} s, final loss ${result.trainLoss?.toFixed(4)}${result.validationLoss === undefined ? '' : `, validation loss ${result.validationLoss.toFixed(4)}`}`,
    );
    info(`adapter written to ${outDir} (adapter_config.json, adapter_model.safetensors)`);
    return 0;
  } finally {
    process.off('SIGINT', onInterrupt);
    await trainer.dispose();
  }
}
