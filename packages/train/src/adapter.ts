/**
 * A PEFT adapter on the GPU for inference (evaluation, generation): read the folder, check it
 * against the model, upload A and B.
 */
import { type GpuContext, type Tensor, tensorFromData } from '@webtune/core';
import { type CausalLM, type LoraWeightsByModule, type ModelSource, namedModules } from '@webtune/models';
import { type ImportedAdapter, readPeftAdapter } from './lora/index.js';

export interface LoadedAdapter {
  readonly imported: ImportedAdapter;
  /** For planForward / Generator / evaluateLoss. */
  readonly weights: LoraWeightsByModule;
  /** Warnings to show (unknown config fields, PEFT's own warnings for this config). */
  readonly warnings: readonly string[];
  dispose(): void;
}

export async function loadAdapter(ctx: GpuContext, model: CausalLM, source: ModelSource): Promise<LoadedAdapter> {
  const imported = await readPeftAdapter(source, namedModules(model.config), model.config.modelType);
  const owned: Tensor[] = [];
  const weights = new Map<string, { a: Tensor; b: Tensor; scale: number }>();
  try {
    for (const m of imported.resolved.modules) {
      const w = imported.weights.get(m.name);
      if (!w) throw new Error(`adapter has no weights for ${m.name}`);
      const a = tensorFromData(ctx, w.a, [...m.aShape], 'f32', `${m.name}.lora_A`);
      const b = tensorFromData(ctx, w.b, [...m.bShape], 'f32', `${m.name}.lora_B`);
      owned.push(a, b);
      weights.set(m.name, { a, b, scale: m.scale });
    }
  } catch (e) {
    for (const t of owned) t.dispose();
    throw e;
  }
  return {
    imported,
    weights,
    warnings: imported.warnings,
    dispose() {
      for (const t of owned) t.dispose();
    },
  };
}
