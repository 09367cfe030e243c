/**
 * A child process of the bench driver (the PyTorch baseline, the ONNX exporter) whose stdout is
 * shown live, indented under the driver's own lines, and whose stderr is kept for the error.
 */
import { spawn } from 'node:child_process';

export function runChild(cmd: string, argv: string[], cwd: string): Promise<{ code: number | null; stderr: string }> {
  return new Promise((res, rej) => {
    const child = spawn(cmd, argv, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      for (const line of d.split('\n')) if (line.trim()) console.log(`  ${line}`);
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    child.on('error', rej);
    child.on('close', (code) => res({ code, stderr }));
  });
}
