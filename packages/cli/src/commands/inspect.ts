import { describeAdapter, formatBytes } from '@webtune/core';
import { directorySource, linearModules, loadModelConfig, parameterCount, parameterTable } from '@webtune/models';
import { type FlagSpec, parseFlags } from '../args.js';
import { gpu, userPath } from '../common.js';

export const inspectFlags: Record<string, FlagSpec> = {
  model: { type: 'string', description: 'Hugging Face model folder', required: true },
  json: { type: 'boolean', description: 'print one JSON object', default: false },
};

export async function inspect(argv: string[]): Promise<void> {
  const f = parseFlags(argv, inspectFlags, 'inspect');
  const source = directorySource(userPath(f.model as string));
  const config = await loadModelConfig(source);
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
    console.log('  warning        the largest tensor does not fit one binding on this GPU');
}
