import { basename, dirname } from 'node:path';
import { bytesPerElement, describeAdapter, formatBytes, type GpuContext, WebtuneError } from '@webtune/core';
import {
  directorySource,
  type GgufModel,
  ggufPrecision,
  ggufStoredDTypes,
  linearModules,
  loadModelConfig,
  type ModelConfig,
  openGgufModel,
  parameterCount,
  parameterTable,
} from '@webtune/models';
import {
  checkFits,
  describeSettings,
  estimateMemory,
  type MemoryEstimate,
  type PlanSetting,
  settingsToLower,
  WEBGPU_DEFAULT_LIMITS,
} from '@webtune/train';
import { type FlagSpec, parseFlags, UsageError } from '../args.js';
import { gpu, info, modelPath, PRECISION_HELP, precisionFlag, userPath } from '../common.js';

export const inspectFlags: Record<string, FlagSpec> = {
  model: {
    type: 'string',
    description: 'Hugging Face model folder (or its config.json alone), or a .gguf file',
    required: true,
  },
  json: { type: 'boolean', description: 'print one JSON object', default: false },
  memory: {
    type: 'boolean',
    description: 'plan the GPU memory of LoRA training from config.json alone (no weights read)',
    default: false,
  },
  precision: { type: 'string', description: `with --memory: ${PRECISION_HELP}` },
  rank: { type: 'int', description: 'with --memory: LoRA rank r', default: 8 },
  alpha: { type: 'number', description: 'with --memory: lora_alpha (default 2·rank)' },
  targets: {
    type: 'string',
    description: 'with --memory: comma-separated module names, or all-linear (default: PEFT’s for the model)',
  },
  batch: { type: 'int', description: 'with --memory: sequences per micro-batch', default: 4 },
  seq: { type: 'int', description: 'with --memory: tokens per sequence', default: 128 },
  'grad-accum': { type: 'int', description: 'with --memory: micro-batches per optimizer step', default: 1 },
  recompute: { type: 'boolean', description: 'with --memory: recompute activations in the backward', default: false },
  'default-limits': {
    type: 'boolean',
    description: "with --memory: plan for WebGPU's default limits (128 MiB per binding) instead of this GPU's",
    default: false,
  },
};

/** The folder of --model: a folder, or the folder of a config.json given directly. */
function modelFolder(path: string): string {
  const p = userPath(path);
  return basename(p) === 'config.json' ? dirname(p) : p;
}

export async function inspect(argv: string[]): Promise<void> {
  const f = parseFlags(argv, inspectFlags, 'inspect');
  const path = modelPath(f.model as string);
  // A GGUF file: its metadata is the config; its tensors' formats are the default plan.
  const gguf = path.gguf ? await openGgufModel(directorySource(path.folder), path.gguf) : undefined;
  const config = gguf?.config ?? (await loadModelConfig(directorySource(modelFolder(f.model as string))));
  if (f.memory) {
    await memoryPlan(config, f, gguf);
    return;
  }
  const params = parameterCount(config);
  // Matrices at the chosen precision; norms and biases are always kept in f32.
  let f16Bytes = 0;
  let largest = 0;
  for (const p of parameterTable(config)) {
    const n = p.shape.reduce((a, b) => a * b, 1);
    f16Bytes += n * (p.precision === 'f32' ? 4 : 2);
    largest = Math.max(largest, n);
  }
  const ctx = await gpu();
  const limits = ctx.limits;
  const report = {
    architecture: config.architecture,
    modelType: config.modelType,
    parameters: params,
    layers: config.numLayers,
    hiddenSize: config.hiddenSize,
    heads: config.numHeads,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
    intermediateSize: config.intermediateSize,
    vocabSize: config.vocabSize,
    maxPositions: config.maxPositions,
    tiedEmbeddings: config.tieWordEmbeddings,
    linearModules: linearModules(config).length,
    bytesF16: f16Bytes,
    bytesF32: params * 4,
    gpu: describeAdapter(ctx),
    maxBufferSize: limits.maxBufferSize,
    maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
    largestTensorFitsF16: largest * 2 <= limits.maxStorageBufferBindingSize,
    largestTensorFitsF32: largest * 4 <= limits.maxStorageBufferBindingSize,
  };
  ctx.destroy();
  if (f.json) {
    console.log(JSON.stringify(report));
    return;
  }
  console.log(`${report.architecture} (${report.modelType})`);
  console.log(`  parameters     ${params.toLocaleString('en-US')}`);
  console.log(
    `  layers         ${config.numLayers}, hidden ${config.hiddenSize}, heads ${config.numHeads}/${config.numKvHeads} kv, head_dim ${config.headDim}, mlp ${config.intermediateSize}`,
  );
  console.log(
    `  vocabulary     ${config.vocabSize}${config.tieWordEmbeddings ? ' (tied embeddings)' : ''}, context ${config.maxPositions}`,
  );
  console.log(`  weights        ${formatBytes(f16Bytes)} at f16, ${formatBytes(params * 4)} at f32`);
  console.log(`  GPU            ${report.gpu}`);
  console.log(
    `  buffer limits  ${formatBytes(limits.maxBufferSize)} per buffer, ${formatBytes(limits.maxStorageBufferBindingSize)} per binding`,
  );
  if (!report.largestTensorFitsF16)
    console.log('  warning        the largest tensor is split by rows on this GPU (it exceeds one binding)');
}

/** The frozen weights by stored dtype: bytes, how many tensors, and why some are not at the
 * run's precision. */
function weightsByDType(e: MemoryEstimate): { dtype: string; bytes: number; tensors: number; notes: string[] }[] {
  const groups = new Map<string, { dtype: string; bytes: number; tensors: number; notes: string[] }>();
  for (const b of e.buffers) {
    if (b.category !== 'frozenWeights') continue;
    const g = groups.get(b.dtype) ?? { dtype: b.dtype, bytes: 0, tensors: 0, notes: [] };
    g.bytes += b.shape.reduce((n, x) => n * x, 1) * bytesPerElement(b.dtype) * b.count;
    g.tensors += b.count;
    if (b.note && !g.notes.includes(b.note)) g.notes.push(b.note);
    groups.set(b.dtype, g);
  }
  return [...groups.values()].sort((a, b) => b.bytes - a.bytes);
}

async function memoryPlan(config: ModelConfig, f: Record<string, unknown>, gguf?: GgufModel): Promise<void> {
  const asked = precisionFlag(f.precision);
  const storedDTypes = gguf ? ggufStoredDTypes(gguf, asked) : undefined;
  const precision = asked ?? (storedDTypes ? ggufPrecision(storedDTypes) : 'f16');
  const rank = f.rank as number;
  const targets = f.targets as string | undefined;
  const lora = {
    r: rank,
    lora_alpha: (f.alpha as number | undefined) ?? 2 * rank,
    ...(targets === undefined
      ? {}
      : {
          target_modules:
            targets === 'all-linear'
              ? 'all-linear'
              : targets
                  .split(',')
                  .map((t) => t.trim())
                  .filter(Boolean),
        }),
  };
  // The plan for the GPU found (its real limits), or for WebGPU's default limits without one.
  let ctx: GpuContext | undefined;
  if (!f['default-limits']) {
    try {
      ctx = await gpu();
    } catch (e) {
      if (!(e instanceof WebtuneError)) throw e;
      info(`no GPU (${e.message}): planning for WebGPU's default limits`);
    }
  }
  try {
    const options = {
      batch: f.batch as number,
      seq: f.seq as number,
      gradAccum: f['grad-accum'] as number,
      recompute: f.recompute as boolean,
      precision,
      ...(storedDTypes ? { storedDTypes } : {}),
    };
    let estimate: MemoryEstimate;
    try {
      estimate = estimateMemory(config, lora, { ...options, ...(ctx ? { device: ctx } : {}) });
    } catch (e) {
      if (e instanceof WebtuneError) throw new UsageError(`inspect --memory: ${e.message}`);
      throw e;
    }
    let problem: string | undefined;
    let lower: readonly PlanSetting[] = [];
    const limits = ctx?.limits ?? WEBGPU_DEFAULT_LIMITS;
    if (ctx) {
      try {
        checkFits(ctx, estimate);
      } catch (e) {
        if (!(e instanceof WebtuneError)) throw e;
        problem = e.message;
        lower = (e as { lower?: readonly PlanSetting[] }).lower ?? settingsToLower(estimate);
      }
    }
    const weights = weightsByDType(estimate);
    const s = estimate.settings;
    const report = {
      architecture: config.architecture,
      settings: { ...s, lora },
      frozenWeights: estimate.frozenWeights,
      trainable: estimate.trainable,
      activations: estimate.activations,
      scratch: estimate.scratch,
      total: estimate.total,
      weights,
      largestBuffer: estimate.largestBuffer,
      device: {
        description: ctx
          ? describeAdapter(ctx)
          : `WebGPU's default limits${f['default-limits'] ? '' : ' (no GPU found)'}`,
        maxBufferSize: limits.maxBufferSize,
        maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
      },
      fits: ctx ? problem === undefined : undefined,
      ...(problem ? { problem, lower } : {}),
    };
    if (f.json) {
      console.log(JSON.stringify(report));
      return;
    }
    const mib = (n: number) => formatBytes(n).padStart(10);
    const line = (label: string, text: string) => console.log(`  ${label.padEnd(19)}${text}`);
    const tensors = (n: number) => `${n} tensor${n === 1 ? '' : 's'}`;
    const targetText = targets ?? 'PEFT’s default targets';
    console.log(
      `${config.architecture} (${config.modelType}): GPU memory of LoRA training, planned from ${gguf ? `${gguf.header.file}'s metadata` : 'config.json'}`,
    );
    line(
      'settings',
      `${precision} weights, r ${rank} (alpha ${lora.lora_alpha}) on ${s.adaptedModules} modules (${targetText}), batch ${s.batch} × seq ${s.seq}${s.gradAccum > 1 ? ` × ${s.gradAccum} accumulated` : ''}${s.recompute ? ', recompute' : ''}`,
    );
    const byDType = weights.map(
      (w) =>
        `${w.dtype} ${formatBytes(w.bytes)} in ${tensors(w.tensors)}${w.notes.length ? ` (${w.notes.join('; ')})` : ''}`,
    );
    line('weights', `${mib(estimate.frozenWeights)}   ${byDType.join(', ')}`);
    line(
      'adapter + AdamW',
      `${mib(estimate.trainable)}   ${s.trainableParameters.toLocaleString('en-US')} parameters; A, B, their gradients, m and v in f32`,
    );
    line('activations', mib(estimate.activations));
    line('scratch', mib(estimate.scratch));
    line('total', `${mib(estimate.total)}   (${(estimate.total / 1e9).toFixed(2)} GB)`);
    line(
      'dispatches',
      `${s.dispatchesPerStep.toLocaleString('en-US')} compute dispatches per optimizer step, 1 submit`,
    );
    const lb = estimate.largestBuffer;
    line(
      'largest buffer',
      `${mib(lb.bytes)}   ${lb.label} ${lb.dtype}[${lb.shape.join(', ')}] (limits: ${formatBytes(limits.maxStorageBufferBindingSize)} per binding, ${formatBytes(limits.maxBufferSize)} per buffer)`,
    );
    line('device', report.device.description);
    if (ctx) line(problem ? 'does not fit' : 'fits', problem ?? 'every buffer within the device limits');
    if (problem && lower.length > 0) line('to shrink it', describeSettings(lower));
  } finally {
    ctx?.destroy();
  }
}
