/**
 * A model's fingerprint: identifies its weights without reading them all, so that an adapter or a
 * checkpoint can be checked against the model it is used with.
 *
 * SHA-256 over config.json, then for every tensor (in name order) its name, dtype, shape and 64
 * bytes from the middle of its data (all of it when smaller). Any change of shape, dtype or
 * layout changes it; so does any change of values that reaches the sampled bytes, which a real
 * change of weights does: fine-tuning (or merging a LoRA adapter into) a matrix changes nearly
 * every element, and 16 to 32 consecutive elements of each matrix are sampled. A change confined
 * to elements outside every sample would go unnoticed; reading every byte of a multi-gigabyte
 * checkpoint at each load is the price that would close that gap.
 */
import { openModelWeights } from './safetensors.js';
import type { ModelSource } from './source.js';

const SAMPLE = 64;

export async function modelFingerprint(source: ModelSource): Promise<string> {
  const encoder = new TextEncoder();
  const parts: Uint8Array[] = [encoder.encode((await source.readText('config.json')) ?? '')];
  const weights = await openModelWeights(source);
  const infos = [...(await weights.infos()).values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const samples = await Promise.all(
    infos.map((t) => {
      const length = t.end - t.begin;
      const start = t.begin + Math.max(0, Math.floor((length - SAMPLE) / 2));
      return source.readRange(t.file, start, Math.min(t.end, start + SAMPLE));
    }),
  );
  infos.forEach((t, i) => {
    parts.push(encoder.encode(`${t.name}|${t.dtype}|${t.shape.join('x')}|`), samples[i] as Uint8Array);
  });
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    all.set(p, offset);
    offset += p.length;
  }
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', all));
  return [...digest.slice(0, 16)].map((b) => b.toString(16).padStart(2, '0')).join('');
}
