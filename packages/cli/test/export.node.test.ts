// `webtune export` end to end, as a user runs it (a child process over the committed fixtures):
// --merge writes a model folder whose `webtune eval` loss equals the base model's with
// `--adapter`; --llama-cpp rewrites an rsLoRA adapter's alpha to alpha·√r and refuses one that no
// single alpha can express; the output replaces --out atomically and never an input folder.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { directorySource, loadModelConfig, namedModules } from '@webtune/models';
import { afterAll, describe, expect, it } from 'vitest';
import { readPeftAdapter } from '../../train/src/lora/index.js';
import { root, webtune } from './run.js';

const work = mkdtempSync(join(tmpdir(), 'webtune-export-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const golden = (run: string) => `packages/train/test/golden/peft-train/${run}/adapter`;
const text = 'packages/models/test/fixtures/text/shakespeare-4k.txt';

function evalLoss(...args: string[]): number {
  const r = webtune('eval', '--data', text, '--seq', '32', '--json', '--precision', 'f32', ...args);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout.trim()) as { loss: number }).loss;
}

describe('webtune export', () => {
  it('--merge: the merged folder evaluates like the base model with the adapter', () => {
    const model = 'packages/models/test/fixtures/tiny-gpt2';
    const out = join(work, 'merged-gpt2');
    // A stale folder at --out is replaced as a whole.
    mkdirSync(out, { recursive: true });
    writeFileSync(join(out, 'stale.txt'), 'old');
    const r = webtune('export', '--model', model, '--adapter', golden('tiny-gpt2-B'), '--out', out, '--merge');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/merged 8 weights/);
    expect(readdirSync(out).sort()).toEqual([
      'config.json',
      'generation_config.json',
      'model.safetensors',
      'tokenizer.json',
      'tokenizer_config.json',
    ]);
    expect(readdirSync(work).filter((f) => f.includes('.partial-') || f.includes('.old-'))).toEqual([]);
    const merged = evalLoss('--model', out);
    const withAdapter = evalLoss('--model', model, '--adapter', golden('tiny-gpt2-B'));
    const base = evalLoss('--model', model);
    expect(Math.abs(merged - withAdapter) / withAdapter).toBeLessThan(1e-5);
    expect(Math.abs(base - withAdapter) / withAdapter).toBeGreaterThan(1e-3);
    console.log(`tiny-gpt2-B eval loss: merged ${merged}, base + adapter ${withAdapter}, base ${base}`);
  });

  it('--llama-cpp: alpha·√r for rsLoRA, tensors unchanged, same scales', async () => {
    const out = join(work, 'llama-cpp');
    const adapter = golden('tiny-qwen3-B');
    const r = webtune(
      'export',
      '--model',
      'packages/models/test/fixtures/tiny-qwen3',
      '--adapter',
      adapter,
      '--out',
      out,
      '--llama-cpp',
    );
    expect(r.code, r.stderr).toBe(0);
    const config = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    const original = JSON.parse(readFileSync(join(root, adapter, 'adapter_config.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    expect(original.use_rslora).toBe(true);
    expect(config.use_rslora).toBe(false);
    expect(config.r).toBe(8);
    expect(config.lora_alpha).toBe(16 * Math.sqrt(8));
    expect(readFileSync(join(out, 'adapter_model.safetensors'))).toEqual(
      readFileSync(join(root, adapter, 'adapter_model.safetensors')),
    );
    // PEFT (and webtune) apply alpha' / r = alpha / √r: every module keeps its scale.
    const config3 = await loadModelConfig(directorySource(join(root, 'packages/models/test/fixtures/tiny-qwen3')));
    const read = (dir: string) => readPeftAdapter(directorySource(dir), namedModules(config3), config3.modelType);
    const [converted, source] = await Promise.all([read(out), read(join(root, adapter))]);
    expect(converted.resolved.modules.length).toBe(14);
    converted.resolved.modules.forEach((m, i) => {
      const want = source.resolved.modules[i]?.scale as number;
      expect(Math.abs(m.scale - want) / want, m.name).toBeLessThan(1e-14);
    });
  });

  it('--llama-cpp refuses an adapter whose modules need different alphas', () => {
    const adapter = join(work, 'patterned');
    cpSync(join(root, golden('tiny-qwen3-B')), adapter, { recursive: true });
    const file = join(adapter, 'adapter_config.json');
    const config = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    config.alpha_pattern = { q_proj: 32 };
    writeFileSync(file, JSON.stringify(config, null, 2));
    const out = join(work, 'never');
    const r = webtune(
      'export',
      '--model',
      'packages/models/test/fixtures/tiny-qwen3',
      '--adapter',
      adapter,
      '--out',
      out,
      '--llama-cpp',
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/llama\.cpp applies one lora_alpha.*cannot be expressed for llama\.cpp/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(work).filter((f) => f.includes('.partial-'))).toEqual([]);
  });

  it('usage errors: one of --merge / --llama-cpp, and never over an input', () => {
    const model = 'packages/models/test/fixtures/tiny-llama';
    const adapter = golden('tiny-llama-A');
    const neither = webtune('export', '--model', model, '--adapter', adapter, '--out', join(work, 'x'));
    expect(neither.code).toBe(2);
    expect(neither.stderr).toMatch(/--merge .* or --llama-cpp/);
    const both = webtune(
      'export',
      '--model',
      model,
      '--adapter',
      adapter,
      '--out',
      join(work, 'x'),
      '--merge',
      '--llama-cpp',
    );
    expect(both.code).toBe(2);
    const over = webtune('export', '--model', model, '--adapter', adapter, '--out', model, '--merge');
    expect(over.code).toBe(2);
    expect(over.stderr).toMatch(/would replace --model/);
    expect(existsSync(join(root, model, 'model.safetensors'))).toBe(true);
  });
});
