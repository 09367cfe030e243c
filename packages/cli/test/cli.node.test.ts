// The CLI end to end, as a user runs it: a child process over the committed model folders.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { webtune } from './run.js';

const stories = 'apps/studio/public/models/stories260K';

describe('webtune CLI', () => {
  it('generate prints the reference story from stories260K', () => {
    const r = webtune('generate', '--model', stories, '--prompt', '', '--max-new-tokens', '60', '--temperature', '0');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(
      'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high\n',
    );
  });

  it('generate continues a prompt without repeating it', () => {
    const r = webtune(
      'generate',
      '--model',
      stories,
      '--prompt',
      'Once upon a time',
      '--max-new-tokens',
      '8',
      '--temperature',
      '0',
    );
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.startsWith(', there was')).toBe(true);
  });

  it('eval --json agrees with transformers on the fixture text', () => {
    const r = webtune(
      'eval',
      '--model',
      stories,
      '--data',
      'packages/models/test/fixtures/text/shakespeare-4k.txt',
      '--seq',
      '64',
      '--json',
      '--precision',
      'f32',
    );
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim()) as { loss: number; tokens: number; perplexity: number };
    // tools/golden_forward.py: stories260K eval record (seq 64).
    expect(out.tokens).toBe(2434);
    expect(Math.abs(out.loss - 4.35196) / 4.35196).toBeLessThan(1e-5);
  });

  it('inspect reports the architecture and sizes', () => {
    const r = webtune('inspect', '--model', stories, '--json');
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim()) as Record<string, unknown>;
    expect(out.architecture).toBe('LlamaForCausalLM');
    expect(out.parameters).toBe(260_032);
  });

  it('inspect --memory plans Qwen2.5-1.5B at q4_0, r 16, seq 1024 within 2.5 GB from config.json alone', () => {
    const r = webtune(
      'inspect',
      '--memory',
      '--model',
      'packages/train/test/fixtures/configs/Qwen2.5-1.5B/config.json',
      '--precision',
      'q4_0',
      '--rank',
      '16',
      '--targets',
      'all-linear',
      '--batch',
      '1',
      '--seq',
      '1024',
      '--recompute',
      '--default-limits',
      '--json',
    );
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim()) as {
      total: number;
      weights: { dtype: string; tensors: number; notes: string[] }[];
      largestBuffer: { bytes: number };
      device: { maxStorageBufferBindingSize: number };
    };
    expect(out.total).toBeLessThanOrEqual(2.5e9);
    expect(out.weights.find((w) => w.dtype === 'q4_0')?.tensors).toBe(196);
    expect(out.weights.find((w) => w.dtype === 'f16')?.notes).toEqual(['embedding or LM head']);
    // The embedding is planned in parts within WebGPU's default 128 MiB binding.
    expect(out.largestBuffer.bytes).toBeLessThanOrEqual(out.device.maxStorageBufferBindingSize);
    const text = webtune(
      'inspect',
      '--memory',
      '--model',
      'packages/train/test/fixtures/configs/Qwen2.5-0.5B',
      '--precision',
      'q4_0',
      '--rank',
      '16',
      '--targets',
      'all-linear',
      '--batch',
      '1',
      '--seq',
      '1024',
      '--recompute',
    );
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/q4_0 192\.0 MiB in 168 tensors/);
    // Qwen2.5-0.5B's plan stays under the 1.0 GB target; the text also gives the step's
    // dispatch count.
    const gb = Number(/total +\d+\.\d MiB +\((\d\.\d\d) GB\)/.exec(text.stdout)?.[1]);
    expect(gb).toBeGreaterThan(0.5);
    expect(gb).toBeLessThan(1.0);
    expect(text.stdout).toMatch(/dispatches +[\d,]+ compute dispatches per optimizer step, 1 submit/);
    expect(webtune('inspect', '--memory', '--model', stories, '--precision', 'q3_k').stderr).toMatch(
      /--precision must be f16, f32, q8_0, q4_0; got "q3_k"/,
    );
  });

  it('explains bad input without a stack trace', () => {
    const dir = mkdtempSync(join(tmpdir(), 'webtune-cli-'));
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ architectures: ['MambaForCausalLM'] }));
    const r = webtune('inspect', '--model', dir);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /MambaForCausalLM.*not supported; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel/,
    );
    expect(r.stderr).not.toMatch(/\n\s+at /);
    const missing = webtune('eval', '--model', stories);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/--data is required/);
    const tiles = webtune('generate', '--model', stories, '--prompt', 'x', '--tile-math', 'bf16');
    expect(tiles.code).toBe(2);
    expect(tiles.stderr).toMatch(/--tile-math must be f16 or f32; got "bf16"/);
    const nope = webtune('generate', '--model', join(dir, 'nothing-here'), '--prompt', 'x');
    expect(nope.code).toBe(1);
    expect(nope.stderr).toMatch(/tokenizer\.json|config\.json/);
  });
});
