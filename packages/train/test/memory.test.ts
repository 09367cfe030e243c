// estimateMemory against what LoraTrainer really allocates (its `memory` breakdown and the
// context's live bytes) on every tiny fixture and stories260K, for several batch × seq × rank ×
// targets settings, with and without recomputation; the estimate without a device; and
// checkFits' preflight errors.
import { diffCounters, formatBytes, type GpuContext, isCpuAdapter, LimitExceededError } from '@webtune/core';
import {
  directorySource,
  loadModel,
  type ModelSource,
  parseModelConfig,
  urlSource,
  type WeightPrecision,
} from '@webtune/models';
import { afterAll, describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { checkFits, estimateMemory, MemoryBudgetError, type MemoryEstimate, PlanTooLargeError } from '../src/memory.js';
import { LoraTrainer, type TrainerMemory } from '../src/trainer.js';

const gpu = useGpu();

async function repoSource(relative: string): Promise<ModelSource> {
  if (typeof window !== 'undefined') return urlSource(new URL(`/${relative}/`, window.location.origin).href);
  const { fileURLToPath } = await import('node:url');
  return directorySource(fileURLToPath(new URL(`../../../${relative}`, import.meta.url)));
}

const fixturePath = (name: string) =>
  name === 'stories260K' ? 'apps/studio/public/models/stories260K' : `packages/models/test/fixtures/${name}`;

interface Setting {
  batch: number;
  seq: number;
  gradAccum?: number;
  recompute?: boolean;
  precision: WeightPrecision;
  lora: Record<string, unknown>;
  /** Split the vocabulary tables into parts of at most this many bytes. */
  tablePartBytes?: number;
}

// Per fixture: PEFT's default targets at r 4, and all-linear rsLoRA at r 8 with accumulation.
const SMALL: Setting = { batch: 2, seq: 16, precision: 'f32', lora: { r: 4, lora_alpha: 8 } };
const WIDE: Setting = {
  batch: 3,
  seq: 24,
  gradAccum: 2,
  precision: 'f16',
  lora: { r: 8, lora_alpha: 16, target_modules: 'all-linear', use_rslora: true },
};
const CASES: [string, Setting][] = [
  ...['tiny-llama', 'tiny-llama3', 'tiny-qwen2', 'tiny-qwen3', 'tiny-gpt2'].flatMap(
    (f) =>
      [
        [f, SMALL],
        [f, WIDE],
      ] as [string, Setting][],
  ),
  [
    'stories260K',
    { batch: 4, seq: 64, precision: 'f16', lora: { r: 8, lora_alpha: 16, target_modules: 'all-linear' } },
  ],
  // Recomputation: each layer keeps its input and LoRA h; one shared set of layer activations.
  ...['tiny-qwen3', 'tiny-gpt2', 'stories260K'].map((f) => [f, { ...WIDE, recompute: true }] as [string, Setting]),
  // A block-quantized base: quantized linears, f16 embedding and the rest f16 or f32 as stored.
  ['tiny-qwen2-q', { ...WIDE, precision: 'q4_0' }],
  ['tiny-gpt2-q', { ...SMALL, precision: 'q8_0', recompute: true }],
  // Tied embedding in 4 parts of 128 rows; untied embedding and LM head in 3 parts each.
  ['tiny-qwen2-q', { ...SMALL, precision: 'q8_0', tablePartBytes: 20_000 }],
  ['tiny-llama', { ...WIDE, tablePartBytes: 20_000 }],
  // Ranks above LORA_GDB_CPU_MAX_RANK: on CPU adapters their g and dB are two dispatches, a pair's
  // too (those adapters plan no lora_g_db_pair); at r 8 one.
  [
    'tiny-qwen2',
    { ...WIDE, lora: { r: 32, lora_alpha: 32, target_modules: 'all-linear', rank_pattern: { k_proj: 8, o_proj: 8 } } },
  ],
  ['tiny-gpt2', { ...SMALL, lora: { r: 24, lora_alpha: 24, target_modules: 'all-linear' } }],
  // LoRA dropout: the masked-input scratch and the counters.
  ['tiny-qwen3', { ...WIDE, lora: { ...WIDE.lora, lora_dropout: 0.1 } }],
  [
    'stories260K',
    {
      batch: 1,
      seq: 256,
      precision: 'f32',
      lora: {
        r: 16,
        lora_alpha: 16,
        target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
        rank_pattern: { o_proj: 4 },
      },
    },
  ],
];

const CATEGORIES = ['frozenWeights', 'trainable', 'activations', 'scratch', 'total'] as const;

function ratios(est: MemoryEstimate, actual: TrainerMemory): Record<(typeof CATEGORIES)[number], number> {
  return Object.fromEntries(CATEGORIES.map((k) => [k, est[k] / actual[k]])) as Record<
    (typeof CATEGORIES)[number],
    number
  >;
}

const table: string[] = [];
afterAll(() => console.log(`estimate / allocated bytes\n${table.join('\n')}`));

describe('estimateMemory against LoraTrainer', () => {
  for (const [fixture, s] of CASES) {
    const name = `${fixture} B${s.batch} T${s.seq}${s.gradAccum ? ` K${s.gradAccum}` : ''}${s.recompute ? ' recompute' : ''} ${s.precision}${s.tablePartBytes ? ` tables in parts of ≤ ${s.tablePartBytes} B` : ''} ${JSON.stringify(s.lora)}`;
    it(name, async () => {
      const ctx = gpu();
      const source = await repoSource(fixturePath(fixture));
      const { memory, live, est, dispatches } = await gpuCase(ctx, name, async () => {
        const model = await loadModel(ctx, source, { precision: s.precision, tablePartBytes: s.tablePartBytes });
        const est = estimateMemory(model.config, s.lora, {
          tablePartBytes: s.tablePartBytes,
          batch: s.batch,
          seq: s.seq,
          gradAccum: s.gradAccum,
          recompute: s.recompute,
          precision: s.precision,
          device: ctx,
        });
        checkFits(ctx, est);
        const before = ctx.liveBytes;
        const trainer = await LoraTrainer.create(ctx, model, {
          lora: s.lora,
          batch: s.batch,
          seq: s.seq,
          gradAccum: s.gradAccum,
          recompute: s.recompute,
          optimizer: { lr: 1e-3 },
        });
        const live = ctx.liveBytes - before;
        const memory = trainer.memory;
        // One step: its runtime dispatch count is the one the estimate predicted from the planners.
        const rows = s.batch * s.seq;
        const micro = Array.from({ length: s.gradAccum ?? 1 }, (_, k) => {
          const ids = Array.from({ length: rows }, (_, i) => (i * 7 + k * 13 + 1) % model.config.vocabSize);
          return { inputIds: ids, labels: ids };
        });
        const c0 = ctx.counters;
        await trainer.trainStep(micro);
        const dispatches = diffCounters(c0, ctx.counters).dispatches;
        trainer.dispose();
        model.dispose();
        return { memory, live, est, dispatches };
      });
      expect(dispatches, 'dispatches of one step').toBe(est.settings.dispatchesPerStep);
      const r = ratios(est, memory);
      table.push(
        `${name}\n    ${CATEGORIES.map((k) => `${k} ${est[k]} / ${memory[k]} = ${(r[k] as number).toFixed(4)}`).join(', ')}`,
      );
      // Weights and the arenas are exact; activations and scratch differ only by the uniform
      // buffers' nominal sizes (80 bytes each; the structs are 16 to 208).
      expect(est.frozenWeights).toBe(memory.frozenWeights);
      expect(est.trainable).toBe(memory.trainable);
      for (const k of CATEGORIES) expect(Math.abs((r[k] as number) - 1), k).toBeLessThan(0.05);
      expect(Math.abs((r.total as number) - 1), 'total').toBeLessThan(0.01);
      expect(Math.abs(est.trainable + est.activations + est.scratch - live) / live).toBeLessThan(0.01);
    });
  }
});

describe('device limits and budget', () => {
  // A Qwen2.5-0.5B-shaped config: a big vocabulary (chunked loss) and a big embedding.
  const qwen = parseModelConfig({
    architectures: ['Qwen2ForCausalLM'],
    model_type: 'qwen2',
    vocab_size: 151936,
    hidden_size: 896,
    intermediate_size: 4864,
    num_hidden_layers: 24,
    num_attention_heads: 14,
    num_key_value_heads: 2,
    max_position_embeddings: 32768,
    tie_word_embeddings: true,
  });

  it('without a device, the given limits reproduce the device’s plan', () => {
    const ctx = gpu();
    for (const [batch, seq] of [
      [1, 128],
      [8, 1024],
      [16, 4096],
    ] as const) {
      const options = { batch, seq, gradAccum: 3 };
      const lora = { r: 16, lora_alpha: 32, target_modules: 'all-linear' };
      const onDevice = estimateMemory(qwen, lora, { ...options, device: ctx });
      const described = estimateMemory(qwen, lora, {
        ...options,
        limits: ctx.limits,
        cpuAdapter: isCpuAdapter(ctx),
      });
      expect(described).toEqual(onDevice);
      // At least 4096 rows of E per chunk, more while the logits scratch stays within 32 MiB.
      expect(onDevice.settings.lossChunk).toBeLessThanOrEqual(Math.max(4096, (32 * 2 ** 20) / (4 * batch * seq)));
    }
  });

  it('the estimate scales as the shapes say', () => {
    const lora = { r: 8, lora_alpha: 16 };
    const a = estimateMemory(qwen, lora, { batch: 4, seq: 512 });
    const b = estimateMemory(qwen, lora, { batch: 8, seq: 512 });
    const rc = estimateMemory(qwen, lora, { batch: 8, seq: 512, recompute: true });
    const f32 = estimateMemory(qwen, lora, { batch: 4, seq: 512, precision: 'f32' });
    // Activations are linear in batch·seq (up to the few fixed-size buffers).
    expect(b.activations / a.activations).toBeCloseTo(2, 2);
    // Recompute: L·rows·d + LoRA h + one layer, against L layers of everything.
    const rows = 8 * 512;
    const kept = 24 * rows * 896 * 4;
    expect(rc.activations).toBeGreaterThan(kept);
    expect(rc.activations).toBeLessThan(b.activations / 5);
    // q_proj, v_proj in 24 layers at r 8: r·(in + out) per module, four copies.
    const params = 24 * 8 * (896 + 896 + 896 + 128);
    expect(a.settings.trainableParameters).toBe(params);
    expect(a.trainable).toBeGreaterThanOrEqual(4 * 4 * params);
    expect(f32.frozenWeights).toBeGreaterThan(1.9 * a.frozenWeights);
    // The embedding (f16 [151936, 896], 260 MiB) is over WebGPU's default binding limit of
    // 128 MiB: it is planned in three parts of whole rows, each within the limit.
    const parts = a.buffers.filter((x) => x.label.startsWith('model.embed_tokens.weight'));
    expect(parts.reduce((n, x) => n + x.count * (x.shape[0] as number), 0)).toBe(151936);
    expect(parts.reduce((n, x) => n + x.count, 0)).toBe(3);
    expect(a.largestBuffer.bytes).toBeLessThanOrEqual(128 * 2 ** 20);
    console.log(
      `Qwen2.5-0.5B shape, q/v r 8, B 8 × T 512: total ${formatBytes(b.total)} (activations ${formatBytes(b.activations)}), with recompute ${formatBytes(rc.total)} (activations ${formatBytes(rc.activations)})`,
    );
  });

  it('checkFits names the biggest buffer over the binding limit, and compares the total with a budget', () => {
    const ctx = gpu();
    // An MLP so wide that one activation [rows, I] cannot be bound on any device.
    const wide = parseModelConfig({
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      vocab_size: 256,
      hidden_size: 64,
      intermediate_size: 2 ** 20,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      max_position_embeddings: 8192,
    });
    const est = estimateMemory(wide, { r: 4, lora_alpha: 8 }, { batch: 1, seq: 8192, device: ctx });
    let error: unknown;
    try {
      checkFits(ctx, est);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(LimitExceededError);
    const e = error as LimitExceededError;
    expect(e.requested).toBe(8192 * 2 ** 20 * 4);
    expect(['maxStorageBufferBindingSize', 'maxBufferSize']).toContain(e.limit);
    expect(e.message).toMatch(/train\.layer\{i\}\.gate f32\[8192, 1048576\] \(and \d+ more buffers over the limit\)/);
    expect(e).toBeInstanceOf(PlanTooLargeError);
    expect((e as PlanTooLargeError).lower).toEqual(['seq']);
    expect(e.message).toMatch(/try a shorter sequence$/);

    // The Qwen-shaped embedding (f16 [151936, 896], 260 MiB) fits every device: split by rows on
    // one whose binding limit is WebGPU's 128 MiB default (lavapipe through the compatibility
    // adapter), whole on one that binds more (SwiftShader).
    const big = estimateMemory(qwen, { r: 8, lora_alpha: 16 }, { batch: 1, seq: 64, device: ctx });
    expect(() => checkFits(ctx, big)).not.toThrow();
    expect(big.largestBuffer.bytes).toBeLessThanOrEqual(ctx.limits.maxStorageBufferBindingSize);

    const small = estimateMemory(
      { ...wide, intermediateSize: 256 },
      { r: 8, lora_alpha: 16 },
      { batch: 2, seq: 64, device: ctx },
    );
    expect(() => checkFits(ctx as GpuContext, small, { budget: small.total })).not.toThrow();
    expect(() => checkFits(ctx, small, { budget: small.total - 1 })).toThrow(MemoryBudgetError);
    expect(() => checkFits(ctx, small, { budget: small.total - 1 })).toThrow(
      /over the budget of .*: try recompute .*; or a smaller batch .*; or a shorter sequence; or a smaller --precision .*; or a lower rank r/,
    );
  });
});
