/** What every command shares: paths, the GPU context, loading a model folder, messages. */
import { basename, dirname, isAbsolute, resolve } from 'node:path';
import { createGpuContext, describeAdapter, type GpuContext, type TileMath } from '@webtune/core';
import {
  type CausalLM,
  directorySource,
  isGgufFileName,
  isWeightPrecision,
  loadGgufTokenizer,
  loadModel,
  loadTokenizer,
  type ModelSource,
  type Tokenizer,
  WEIGHT_PRECISIONS,
  type WeightPrecision,
} from '@webtune/models';
import { type LoadedAdapter, loadAdapter } from '@webtune/train';
import { UsageError } from './args.js';

/** Paths on the command line are relative to where the user ran the command (pnpm runs scripts
 * from the repository root and passes the original directory in INIT_CWD). */
export function userPath(p: string): string {
  return isAbsolute(p) ? p : resolve(process.env.INIT_CWD ?? process.cwd(), p);
}

export function info(message: string): void {
  process.stderr.write(`${message}\n`);
}

export async function gpu(): Promise<GpuContext> {
  const ctx = await createGpuContext({ label: 'webtune-cli' });
  info(
    `GPU: ${describeAdapter(ctx)}${ctx.adapter.softwareFallback ? ' — no GPU found, using the software driver' : ''}`,
  );
  return ctx;
}

export interface OpenedModel {
  source: ModelSource;
  model: CausalLM;
  tokenizer: Tokenizer;
}

/** --model: a Hugging Face folder, or a .gguf file (with its folder as the source). */
export function modelPath(path: string): { folder: string; gguf?: string } {
  const p = userPath(path);
  return isGgufFileName(p) ? { folder: dirname(p), gguf: basename(p) } : { folder: p };
}

export async function openModel(
  ctx: GpuContext,
  dir: string,
  precision: WeightPrecision | undefined,
): Promise<OpenedModel> {
  const path = modelPath(dir);
  const source = directorySource(path.folder);
  const tokenizer = path.gguf ? await loadGgufTokenizer(source, path.gguf) : await loadTokenizer(source);
  const t0 = performance.now();
  let lastReport = 0;
  const model = await loadModel(ctx, source, {
    // A GGUF file keeps each tensor's format unless a precision is asked for.
    ...(precision !== undefined || !path.gguf ? { precision: precision ?? 'f16' } : {}),
    ...(path.gguf ? { gguf: path.gguf } : {}),
    onProgress: (p) => {
      const now = performance.now();
      if (p.status === 'weights' && now - lastReport > 1000 && p.total > 0) {
        lastReport = now;
        info(`loading weights ${((100 * p.loaded) / p.total).toFixed(0)}%`);
      }
    },
  });
  info(
    `model: ${model.config.architecture}, ${model.config.numLayers} layers, ${(model.bytes / 2 ** 20).toFixed(1)} MiB of ${model.precision} weights on the GPU, loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
  );
  return { source, model, tokenizer };
}

export function precisionFlag(v: unknown): WeightPrecision | undefined {
  if (v === undefined) return undefined;
  if (!isWeightPrecision(v))
    throw new UsageError(`--precision must be ${WEIGHT_PRECISIONS.join(', ')}; got ${JSON.stringify(v)}`);
  return v;
}

/** --tile-math: unset leaves the library's default (f16 on GPUs with shader-f16, else f32). */
export function tileMathFlag(v: unknown): { tileMath?: TileMath } {
  if (v === undefined) return {};
  if (v !== 'f16' && v !== 'f32') throw new UsageError(`--tile-math must be f16 or f32; got ${JSON.stringify(v)}`);
  return { tileMath: v };
}

/** The --precision flag's help text, the same for every command. */
export const PRECISION_HELP =
  'frozen weights on the GPU: f16 (default; a .gguf keeps its own formats), f32, or q8_0 / q4_0 (llama.cpp blocks for the linear layers; embedding and LM head stay f16)';

/** Loads a PEFT adapter folder (ours or PEFT's) for the model, printing its warnings. */
export async function openAdapter(
  ctx: GpuContext,
  model: CausalLM,
  dir: string | undefined,
): Promise<LoadedAdapter | undefined> {
  if (dir === undefined) return undefined;
  const adapter = await loadAdapter(ctx, model, directorySource(userPath(dir)));
  for (const w of adapter.warnings) info(`adapter warning: ${w}`);
  const r = adapter.imported.resolved;
  info(
    `adapter: ${r.modules.length} modules, r ${r.config.r}, alpha ${r.config.lora_alpha}${r.config.use_rslora ? ', rsLoRA' : ''}`,
  );
  return adapter;
}
