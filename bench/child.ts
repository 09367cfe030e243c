/**
 * Child processes of the bench driver: the PyTorch baseline and the ONNX exporter (runChild),
 * whose stdout is shown live, indented under the driver's own lines, and whose stderr is kept for
 * the error; and the Node bench run (runLines), whose every line the driver reads.
 */
import { spawn } from 'node:child_process';

export interface ChildEnd {
  /** null when a signal ended it. */
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** The driver killed it at `timeoutMs`. */
  readonly timedOut: boolean;
}

/**
 * Runs `cmd` and hands each whole line of its stdout and stderr to the callbacks as it arrives
 * (a line split across chunks is joined; a last line without a newline is handed over at exit).
 * The callbacks must not throw: they run in the streams' event handlers.
 */
export function runLines(
  cmd: string,
  argv: string[],
  o: {
    cwd: string;
    env?: Record<string, string | undefined>;
    timeoutMs?: number;
    onStdout: (line: string) => void;
    onStderr: (line: string) => void;
  },
): Promise<ChildEnd> {
  return new Promise((res, rej) => {
    const child = spawn(cmd, argv, { cwd: o.cwd, env: o.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    const lines = (stream: NodeJS.ReadableStream, each: (line: string) => void) => {
      let pending = '';
      stream.setEncoding('utf8');
      stream.on('data', (d: string) => {
        const parts = (pending + d).split('\n');
        pending = parts.pop() ?? '';
        for (const line of parts) each(line);
      });
      return () => {
        if (pending) each(pending);
        pending = '';
      };
    };
    const endOut = lines(child.stdout, o.onStdout);
    const endErr = lines(child.stderr, o.onStderr);
    let timedOut = false;
    const timer =
      o.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            child.kill('SIGKILL');
          }, o.timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      rej(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      endOut();
      endErr();
      res({ code, signal, timedOut });
    });
  });
}

/** Runs `cmd` with its stdout shown live and its stderr kept, for the error. */
export async function runChild(
  cmd: string,
  argv: string[],
  cwd: string,
): Promise<{ code: number | null; stderr: string }> {
  let stderr = '';
  const end = await runLines(cmd, argv, {
    cwd,
    onStdout: (line) => {
      if (line.trim()) console.log(`  ${line}`);
    },
    onStderr: (line) => {
      stderr += `${line}\n`;
    },
  });
  return { code: end.code, stderr };
}
