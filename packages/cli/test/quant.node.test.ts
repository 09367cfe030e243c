// QLoRA and GGUF bases from the command line, as a user runs them: `webtune train` on a q4_0 base
// and on a GGUF file, the adapters PEFT then loads on the full-precision models (tools/peft_eval.py,
// which refuses any loading warning) with the loss webtune's own f32 eval gives; the GGUF adapter
// names the Hub model from the file's metadata; eval and generate take --precision and .gguf files.
// The PEFT checks run when a Python with torch, transformers and peft is found (tools/python.ts),
// and are skipped with the reason otherwise.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { findPython, pythonHas } from '../../../tools/python.js';
import { root, webtune } from './run.js';

const python = findPython(root);
const probe = python === undefined ? undefined : pythonHas(python, ['torch', 'transformers', 'peft']);
const noPeft = python === undefined ? 'no Python found' : probe?.ok ? undefined : (probe as { reason: string }).reason;
if (noPeft) console.warn(`quant.node.test.ts: the PEFT checks are skipped: ${noPeft}`);

const text = readFileSync(join(root, 'packages/models/test/fixtures/text/shakespeare-4k.txt'), 'utf8').slice(0, 3000);
const dir = mkdtempSync(join(tmpdir(), 'webtune-quant-'));
const data = join(dir, 'train.txt');
writeFileSync(data, text);

/** webtune eval --json with the adapter on the f32 model, and PEFT's eval of the same. */
function bothEvals(model: string, adapter: string): { ours: number; peft?: number } {
  const r = webtune(
    'eval',
    '--model',
    model,
    '--precision',
    'f32',
    '--adapter',
    adapter,
    '--data',
    data,
    '--seq',
    '32',
    '--json',
  );
  expect(r.code, r.stderr).toBe(0);
  const ours = (JSON.parse(r.stdout.trim()) as { loss: number }).loss;
  if (noPeft) return { ours };
  const p = spawnSync(
    python as string,
    [
      join(root, 'tools/peft_eval.py'),
      '--model',
      join(root, model),
      '--adapter',
      adapter,
      '--data',
      data,
      '--seq',
      '32',
    ],
    { encoding: 'utf8', timeout: 240_000, env: { ...process.env, HF_HUB_OFFLINE: '1' } },
  );
  expect(p.status, p.stderr).toBe(0);
  return { ours, peft: (JSON.parse(p.stdout.trim().split('\n').at(-1) as string) as { loss: number }).loss };
}

function train(model: string, out: string, ...extra: string[]) {
  const r = webtune(
    'train',
    '--model',
    model,
    '--data',
    data,
    '--steps',
    '3',
    '--batch',
    '2',
    '--seq',
    '32',
    '--targets',
    'all-linear',
    '--out',
    out,
    ...extra,
  );
  expect(r.code, r.stderr).toBe(0);
  return r;
}

// Each case runs the CLI several times and, with Python, PEFT on CPU: minutes on a busy 2-core machine.
describe('quantized and GGUF bases from the CLI', () => {
  it('train on a q4_0 base; PEFT loads the adapter on the full-precision model', () => {
    const out = join(dir, 'q4');
    const r = train('packages/models/test/fixtures/tiny-qwen2-q', out, '--precision', 'q4_0');
    expect(r.stderr).toMatch(/of q4_0 weights on the GPU/);
    const e = bothEvals('packages/models/test/fixtures/tiny-qwen2-q', out);
    if (e.peft !== undefined) expect(Math.abs(e.ours - e.peft) / e.peft).toBeLessThan(1e-5);
  }, 600_000);

  it('train on a GGUF file; the adapter names its Hub model, and PEFT loads it on the original', () => {
    const out = join(dir, 'gguf');
    const r = train('packages/models/test/fixtures/gguf/gpt2/tiny-gpt2-q.gguf', out);
    expect(r.stderr).toMatch(/of q4_0 weights on the GPU/);
    const config = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    expect(config.base_model_name_or_path).toBe('webtune-test/tiny-gpt2-q');
    expect(config.fan_in_fan_out).toBe(true);
    // webtune-test/tiny-gpt2-q is the fixture tiny-gpt2-q, the model the file was made from.
    const e = bothEvals('packages/models/test/fixtures/tiny-gpt2-q', out);
    if (e.peft !== undefined) expect(Math.abs(e.ours - e.peft) / e.peft).toBeLessThan(1e-5);
  }, 600_000);

  it('eval and generate take --precision and GGUF files', () => {
    const losses = ['q8_0', 'q4_0'].map((precision) => {
      const r = webtune(
        'eval',
        '--model',
        'packages/models/test/fixtures/tiny-llama-q',
        '--precision',
        precision,
        '--data',
        data,
        '--seq',
        '32',
        '--json',
      );
      expect(r.code, r.stderr).toBe(0);
      return (JSON.parse(r.stdout.trim()) as { loss: number }).loss;
    });
    expect(losses[0]).not.toBe(losses[1]);
    const g = webtune(
      'generate',
      '--model',
      'packages/models/test/fixtures/gguf/stories/tiny-llama-k.gguf',
      '--prompt',
      'Once',
      '--max-new-tokens',
      '5',
      '--temperature',
      '0',
    );
    expect(g.code, g.stderr).toBe(0);
    expect(g.stderr).toMatch(/of q8_0 weights on the GPU/);
    const bad = webtune(
      'eval',
      '--model',
      'packages/models/test/fixtures/tiny-llama-q',
      '--precision',
      'q5_1',
      '--data',
      data,
    );
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--precision must be f16, f32, q8_0, q4_0; got "q5_1"/);
  }, 600_000);
});
