// webtune train end to end in a child process, as a user runs it: the adapter it writes loads and
// lowers the loss on the data; f16 tiles are refused where the adapter cannot run them; Ctrl-C
// saves a checkpoint and --resume finishes the run with exactly the adapter an uninterrupted run
// writes.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { root, webtune } from './run.js';

const stories = 'apps/studio/public/models/stories260K';
const dir = mkdtempSync(join(tmpdir(), 'webtune-train-'));
const data = join(dir, 'stories.txt');
writeFileSync(
  data,
  Array.from({ length: 8 }, () =>
    [
      'Once upon a time there was a little cat. The cat liked to sleep in the sun.',
      'One day the cat saw a bird. The bird sang a happy song.',
      'The cat and the bird became friends. They played in the garden every day.',
    ].join('\n'),
  ).join('\n'),
);
const common = ['--model', stories, '--data', data, '--steps', '10', '--batch', '2', '--seq', '32', '--lr', '5e-3'];
common.push('--checkpoint-every', '2', '--seed', '4');

function evalLoss(adapter?: string): number {
  const r = webtune(
    'eval',
    '--model',
    stories,
    '--data',
    data,
    '--seq',
    '32',
    '--json',
    ...(adapter ? ['--adapter', adapter] : []),
  );
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout.trim()) as { loss: number }).loss;
}

describe('webtune train', () => {
  it('writes a PEFT adapter that loads and lowers the loss on its data', () => {
    const out = join(dir, 'whole');
    // f32 tiles, as asked (the default here too: SwiftShader has no shader-f16).
    const r = webtune('train', ...common, '--out', out, '--tile-math', 'f32');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/step 10\/10/);
    expect(r.stderr).toMatch(/checkpoint saved at step 2/);
    const config = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
    expect(config.peft_type).toBe('LORA');
    expect(config.base_model_name_or_path).toBe(stories);
    expect(existsSync(`${out}.checkpoint`)).toBe(false); // a finished run leaves no checkpoint
    expect(evalLoss(out)).toBeLessThan(evalLoss() - 0.05);
  }, 300_000);

  it('refuses f16 tiles on an adapter without shader-f16, and a tile math it does not know, writing nothing', () => {
    const out = join(dir, 'f16');
    const f16 = webtune('train', ...common, '--out', out, '--tile-math', 'f16');
    expect(f16.code).toBe(1);
    expect(f16.stderr).toMatch(/webtune: trainer: f16 tile math needs an adapter with shader-f16/);
    expect(f16.stderr).not.toMatch(/\n\s+at .*\.m?[jt]s:\d+/); // no JavaScript stack trace
    const bf16 = webtune('train', ...common, '--out', out, '--tile-math', 'bf16');
    expect(bf16.code).toBe(2);
    expect(bf16.stderr).toMatch(/--tile-math must be f16 or f32; got "bf16"/);
    expect(existsSync(out)).toBe(false);
    expect(existsSync(`${out}.checkpoint`)).toBe(false);
  }, 120_000);

  it('stops on Ctrl-C with a checkpoint and --resume ends with the uninterrupted adapter, byte for byte', async () => {
    const out = join(dir, 'cut');
    // Like a terminal: SIGINT to the whole process group once a checkpoint is saved.
    const child = spawn(
      process.execPath,
      [join(root, 'packages/cli/bin/webtune.mjs'), 'train', ...common, '--out', out],
      {
        cwd: root,
        env: { ...process.env, INIT_CWD: root, XDG_RUNTIME_DIR: '/tmp' },
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let stderr = '';
    let sent = false;
    child.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
      if (!sent && /checkpoint saved at step 4/.test(stderr)) {
        sent = true;
        process.kill(-(child.pid as number), 'SIGINT');
      }
    });
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(sent, stderr).toBe(true);
    expect(code, stderr).toBe(130);
    expect(stderr).toMatch(/continue with the same command and --resume/);
    expect(existsSync(out)).toBe(false);
    expect(existsSync(`${out}.checkpoint`)).toBe(true);

    const again = webtune('train', ...common, '--out', out);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/holds the checkpoint of an interrupted run .*--resume/);

    const resumed = webtune('train', ...common, '--out', out, '--resume');
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toMatch(/resuming at step \d+ of 10/);
    expect(resumed.stderr).not.toMatch(/step 1\/10 /);
    const whole = readFileSync(join(dir, 'whole', 'adapter_model.safetensors'));
    expect(readFileSync(join(out, 'adapter_model.safetensors')).equals(whole)).toBe(true);
  }, 300_000);
});
