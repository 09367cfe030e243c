/**
 * Initial LoRA weights, as PEFT 0.21's LoraLayer.update_layer / reset_lora_parameters draws them
 * (same distributions; the numbers come from webtune's own seeded generator, not torch's):
 *
 *   init_lora_weights  A [r, in]                                B [out, r]
 *   true               U(-1/sqrt(in), 1/sqrt(in))               0
 *   'gaussian'         N(0, std = 1/r)                          0
 *   false              U(-1/sqrt(in), 1/sqrt(in))               U(-1/sqrt(r), 1/sqrt(r))
 *
 * U(-b, b) is torch's kaiming_uniform_(w, a=sqrt(5)) on w's fan-in (its second dimension):
 * gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), b = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in); it is also
 * nn.Linear's default initialisation, which is what `false` leaves in place (PEFT then skips
 * reset_lora_parameters, so B keeps nn.Linear(r, out)'s init too). 'gaussian' uses std 1/r, not
 * 1/sqrt(r) (nn.init.normal_(std=1 / r)).
 *
 * Each module draws from its own stream (seed, "<module>/A") and (seed, "<module>/B"), so a
 * module's initial values depend only on the seed, its name, its shape and the init mode.
 */

import { Rng } from '../random.js';
import type { LoraInit } from './config.js';
import type { AdaptedModule, ResolvedLora } from './targets.js';

export type LoraInitDistribution =
  | { readonly kind: 'zeros' }
  | { readonly kind: 'uniform'; readonly bound: number }
  | { readonly kind: 'normal'; readonly std: number };

/** A and B of one module, row-major f32: a [r, in], b [out, r]. */
export interface LoraWeights {
  readonly a: Float32Array;
  readonly b: Float32Array;
}

/** The distributions of A and B for a module of rank r and `inFeatures` inputs. */
export function loraInitDistributions(
  module: { readonly r: number; readonly inFeatures: number },
  init: LoraInit,
): { readonly a: LoraInitDistribution; readonly b: LoraInitDistribution } {
  const kaimingA: LoraInitDistribution = { kind: 'uniform', bound: 1 / Math.sqrt(module.inFeatures) };
  if (init === true) return { a: kaimingA, b: { kind: 'zeros' } };
  if (init === 'gaussian') return { a: { kind: 'normal', std: 1 / module.r }, b: { kind: 'zeros' } };
  return { a: kaimingA, b: { kind: 'uniform', bound: 1 / Math.sqrt(module.r) } };
}

/** `count` values of `dist` from a fresh stream (seed, stream). */
export function sampleLoraInit(dist: LoraInitDistribution, count: number, seed: number, stream: string): Float32Array {
  const out = new Float32Array(count);
  if (dist.kind === 'zeros') return out;
  const rng = new Rng(seed, stream);
  if (dist.kind === 'uniform') {
    for (let i = 0; i < count; i++) out[i] = (2 * rng.uniform() - 1) * dist.bound;
  } else {
    for (let i = 0; i < count; i++) out[i] = rng.normal() * dist.std;
  }
  return out;
}

/** Initial A and B of one adapted module. */
export function initLoraModule(
  module: Pick<AdaptedModule, 'name' | 'r' | 'inFeatures' | 'outFeatures'>,
  init: LoraInit,
  seed: number,
): LoraWeights {
  const { a, b } = loraInitDistributions(module, init);
  return {
    a: sampleLoraInit(a, module.r * module.inFeatures, seed, `${module.name}/A`),
    b: sampleLoraInit(b, module.outFeatures * module.r, seed, `${module.name}/B`),
  };
}

/** Initial A and B of every adapted module, by module name (model order). */
export function initLoraWeights(resolved: ResolvedLora, seed: number): Map<string, LoraWeights> {
  const out = new Map<string, LoraWeights>();
  for (const m of resolved.modules) out.set(m.name, initLoraModule(m, resolved.config.init_lora_weights, seed));
  return out;
}
