// The Node bench run's records reach the driver as lines of a child's stdout (bench/run.ts,
// runNodeAdapter): runLines must hand over whole lines whatever the chunks, the last line without
// its newline included, and say how the child ended.
import { describe, expect, it } from 'vitest';
import { runLines } from './child.js';

/** Runs a Node script and collects what runLines hands over. */
async function collect(script: string, timeoutMs?: number) {
  const out: string[] = [];
  const err: string[] = [];
  const end = await runLines(process.execPath, ['-e', script], {
    cwd: process.cwd(),
    timeoutMs,
    onStdout: (line) => out.push(line),
    onStderr: (line) => err.push(line),
  });
  return { out, err, end };
}

describe('runLines', () => {
  it('joins a line written in pieces and keeps the last one without a newline', async () => {
    // Pieces written apart in time arrive as separate chunks; a long line spans several.
    const long = 'x'.repeat(200_000);
    const { out, err, end } = await collect(`
      const w = (s) => new Promise((r) => process.stdout.write(s, r));
      (async () => {
        await w('[record] {"a":');
        await new Promise((r) => setTimeout(r, 50));
        await w('1}\\nsecond\\n' + 'x'.repeat(${long.length}) + '\\n');
        process.stderr.write('warn\\n');
        await w('[done]');
      })();`);
    expect(out).toEqual(['[record] {"a":1}', 'second', long, '[done]']);
    expect(err).toEqual(['warn']);
    expect(end).toEqual({ code: 0, signal: null, timedOut: false });
  });

  it('says which exit code, signal or time-out ended the child', async () => {
    expect((await collect('process.exit(3)')).end).toEqual({ code: 3, signal: null, timedOut: false });
    expect((await collect("process.kill(process.pid, 'SIGTERM')")).end).toEqual({
      code: null,
      signal: 'SIGTERM',
      timedOut: false,
    });
    const slow = await collect('setTimeout(() => {}, 60_000)', 300);
    expect(slow.end).toEqual({ code: null, signal: 'SIGKILL', timedOut: true });
  });
});
