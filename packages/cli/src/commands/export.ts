/**
 * webtune export: turn a PEFT adapter (ours or PEFT's) into what another consumer needs.
 *   --merge      the base model with the adapter merged in (W0 + s·B·A), a full Hugging Face
 *                folder that transformers, vLLM and webtune load without PEFT
 *   --llama-cpp  the adapter with its config rewritten for llama.cpp's convert_lora_to_gguf.py,
 *                which applies one lora_alpha / r per tensor and ignores use_rslora: rsLoRA
 *                adapters get alpha' = alpha·√r (PEFT_FORMAT.md); refused when no single alpha
 *                can express the adapter
 * Runs on the CPU (no GPU needed). The folder is written beside --out and renamed into place, so
 * an interruption never leaves a half-written export.
 */
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { formatBytes } from '@webtune/core';
import { directorySource, loadModelConfig, namedModules } from '@webtune/models';
import {
  directorySink,
  exportPeftAdapter,
  type ImportedAdapter,
  LoraConfigError,
  llamaCppCompatible,
  mergeAdapter,
  type ResolvedLora,
  readPeftAdapter,
} from '@webtune/train';
import { type FlagSpec, parseFlags, UsageError } from '../args.js';
import { info, userPath } from '../common.js';

export const exportFlags: Record<string, FlagSpec> = {
  model: { type: 'string', description: 'the base model folder the adapter was trained on', required: true },
  adapter: { type: 'string', description: 'a PEFT LoRA adapter folder', required: true },
  out: { type: 'string', description: 'folder to write (replaced if it exists)', required: true },
  merge: { type: 'boolean', description: 'write the full model with the adapter merged in', default: false },
  'llama-cpp': {
    type: 'boolean',
    description: 'write the adapter for llama.cpp (rsLoRA alpha rescaled to alpha·√r)',
    default: false,
  },
};

/** The adapter as llama.cpp will apply it: one lora_alpha, scale alpha / r of each tensor. */
export function forLlamaCpp(resolved: ResolvedLora): ResolvedLora {
  const out = llamaCppCompatible(resolved);
  const alpha = out.config.lora_alpha;
  const odd = out.modules.find((m) => Math.abs(m.scale - alpha / m.r) > 1e-12 * Math.abs(m.scale));
  if (odd) {
    throw new LoraConfigError(
      'alpha_pattern',
      `llama.cpp applies one lora_alpha (${alpha}) divided by each tensor's rank, but "${odd.name}" is scaled by ${odd.scale} ` +
        `(alpha ${odd.alpha}, r ${odd.r}): this adapter cannot be expressed for llama.cpp (merge it instead with --merge)`,
    );
  }
  return out;
}

/** Writes a folder through `fill(tmp)` next to `out`, then swaps it into place. */
async function writeAtomically(out: string, fill: (dir: string) => Promise<void>): Promise<void> {
  const tmp = `${out}.partial-${process.pid}`;
  const old = `${out}.old-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  try {
    await mkdir(tmp, { recursive: true });
    await fill(tmp);
    await rm(old, { recursive: true, force: true });
    // Keep the previous folder until the new one is in place.
    const had = await rename(out, old).then(
      () => true,
      (e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT') return false;
        throw e;
      },
    );
    await rename(tmp, out);
    if (had) await rm(old, { recursive: true, force: true });
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

export async function exportCommand(argv: string[]): Promise<void> {
  const f = parseFlags(argv, exportFlags, 'export');
  const merge = f.merge as boolean;
  const llamaCpp = f['llama-cpp'] as boolean;
  if (merge === llamaCpp) {
    throw new UsageError(
      'export: give --merge (a full model with the adapter merged in) or --llama-cpp (the adapter for llama.cpp), one of them',
    );
  }
  const modelDir = userPath(f.model as string);
  const adapterDir = userPath(f.adapter as string);
  const out = resolve(userPath(f.out as string));
  for (const [flag, dir] of [
    ['--model', modelDir],
    ['--adapter', adapterDir],
  ] as const) {
    const input = resolve(dir);
    if (out === input || input.startsWith(`${out}/`))
      throw new UsageError(`export: --out ${out} would replace ${flag} ${dir}; choose another folder`);
  }
  const base = directorySource(modelDir);
  const config = await loadModelConfig(base);
  const adapter: ImportedAdapter = await readPeftAdapter(
    directorySource(adapterDir),
    namedModules(config),
    config.modelType,
  );
  for (const w of adapter.warnings) info(`adapter warning: ${w}`);
  const r = adapter.resolved;
  info(
    `adapter: ${r.modules.length} modules, r ${r.config.r}, alpha ${r.config.lora_alpha}${r.config.use_rslora ? ', rsLoRA' : ''}`,
  );

  if (llamaCpp) {
    const converted = forLlamaCpp(r);
    const files = exportPeftAdapter(converted, adapter.weights, {
      baseModelNameOrPath: adapter.baseModelNameOrPath,
      revision: adapter.revision,
    });
    await writeAtomically(out, async (dir) => {
      for (const [name, data] of Object.entries(files)) await writeFile(join(dir, name), data);
    });
    info(
      r.config.use_rslora
        ? `rsLoRA: lora_alpha ${r.config.lora_alpha} -> ${converted.config.lora_alpha} (alpha·√r), use_rslora false; tensors unchanged`
        : 'not rsLoRA: the config is kept (llama.cpp computes alpha / r as PEFT does)',
    );
    info(`llama.cpp adapter written to ${out} (${Object.keys(files).join(', ')})`);
    return;
  }

  const t0 = performance.now();
  let last = 0;
  let result: Awaited<ReturnType<typeof mergeAdapter>> | undefined;
  await writeAtomically(out, async (dir) => {
    result = await mergeAdapter(base, adapter, directorySink(dir), {
      onProgress: (p) => {
        const now = performance.now();
        if (now - last > 1000) {
          last = now;
          info(`merging ${((100 * p.written) / p.total).toFixed(0)}% (${p.file})`);
        }
      },
    });
  });
  const done = result as NonNullable<typeof result>;
  info(
    `merged ${done.merged.length} weights in ${((performance.now() - t0) / 1000).toFixed(1)} s; wrote ${done.files.length} files (${formatBytes(done.weightBytes)} of weights) to ${out}: ${done.files.join(', ')}`,
  );
}
