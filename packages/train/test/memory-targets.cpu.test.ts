// The memory targets of a block-quantized base (issue 11), planned from config.json alone: LoRA at
// r 16 on every linear layer, batch 1, sequence 1024, recomputation on, q4_0 weights:
// Qwen2.5-1.5B within 2.5 GB and Qwen2.5-0.5B within 1 GB, on WebGPU's default limits, where the
// 151,936-row embedding (f16) is larger than one binding and is planned in parts instead.
import { parseModelConfig } from '@webtune/models';
import { describe, expect, it } from 'vitest';
import { estimateMemory, WEBGPU_DEFAULT_LIMITS } from '../src/memory.js';
import qwen05 from './fixtures/configs/Qwen2.5-0.5B/config.json';
import qwen15 from './fixtures/configs/Qwen2.5-1.5B/config.json';

const LORA = { r: 16, lora_alpha: 32, target_modules: 'all-linear' };
const RUN = { batch: 1, seq: 1024, recompute: true } as const;

describe('memory targets of a q4_0 base', () => {
  for (const [name, json, limit] of [
    ['Qwen2.5-1.5B', qwen15, 2.5e9],
    ['Qwen2.5-0.5B', qwen05, 1e9],
  ] as const) {
    it(`${name}: r 16 all-linear, batch 1 × 1024, recompute, q4_0 within ${limit / 1e9} GB`, () => {
      const config = parseModelConfig(json, `${name}/config.json`);
      const q4 = estimateMemory(config, LORA, { ...RUN, precision: 'q4_0' });
      const f16 = estimateMemory(config, LORA, { ...RUN, precision: 'f16' });
      const q8 = estimateMemory(config, LORA, { ...RUN, precision: 'q8_0' });
      console.log(
        `${name}: total f16 ${(f16.total / 1e9).toFixed(3)} GB, q8_0 ${(q8.total / 1e9).toFixed(3)} GB, q4_0 ${(q4.total / 1e9).toFixed(3)} GB (weights ${(q4.frozenWeights / 1e9).toFixed(3)} GB)`,
      );
      expect(q4.total).toBeLessThanOrEqual(limit);
      expect(q4.total).toBeLessThan(q8.total);
      expect(q8.total).toBeLessThan(f16.total);
      // Every linear weight of these models takes inputs in multiples of 32: all quantized, the
      // embedding (tied LM head) f16 and said so.
      const weights = q4.buffers.filter((b) => b.category === 'frozenWeights');
      const linear = weights.filter((b) => b.label.endsWith('_proj.weight'));
      expect(linear.length).toBe(7 * config.numLayers);
      expect(linear.every((b) => b.dtype === 'q4_0')).toBe(true);
      const embed = weights.filter((b) => b.label.startsWith('model.embed_tokens.weight'));
      expect(embed.every((b) => b.dtype === 'f16' && b.note === 'embedding or LM head')).toBe(true);
      // Larger than the default binding: in parts, each within it.
      expect(embed.reduce((n, b) => n + b.count * (b.shape[0] as number), 0)).toBe(151936);
      expect(embed.reduce((n, b) => n + b.count, 0)).toBeGreaterThan(1);
      expect(q4.largestBuffer.bytes).toBeLessThanOrEqual(WEBGPU_DEFAULT_LIMITS.maxStorageBufferBindingSize);
    });
  }
});
