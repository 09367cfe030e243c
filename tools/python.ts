/**
 * Which Python the benchmark's PyTorch baseline and the tests that check against Python use:
 * $WEBTUNE_PYTHON when set (taken as given, so that a wrong path is reported, not skipped over),
 * else the repository's virtual environment (.venv, or tools/.venv that tools/setup-python.sh
 * makes), else `python3` on PATH. Whether it has the packages a caller needs is the caller's
 * question (pythonHas).
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { delimiter, join } from 'node:path';

const windows = process.platform === 'win32';
const venvPython = (venv: string) => (windows ? join(venv, 'Scripts', 'python.exe') : join(venv, 'bin', 'python'));

/** The interpreter to use, or undefined when there is none. `root` is the repository root. */
export function findPython(root: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (env.WEBTUNE_PYTHON) return env.WEBTUNE_PYTHON;
  for (const venv of ['.venv', 'tools/.venv']) {
    const python = venvPython(join(root, venv));
    if (existsSync(python)) return python;
  }
  const name = windows ? 'python.exe' : 'python3';
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (dir && existsSync(join(dir, name))) return join(dir, name);
  }
  return undefined;
}

/** Whether `python` runs and has every module of `modules` installed (found, not imported: importing
 * torch alone takes seconds); why not, when it does not. */
export function pythonHas(python: string, modules: readonly string[]): { ok: true } | { ok: false; reason: string } {
  const script =
    'import importlib.util, sys; missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]; ' +
    'sys.exit(" ".join(missing) or None)';
  const r = spawnSync(python, ['-c', script, ...modules], { encoding: 'utf8', timeout: 60_000 });
  if (r.error) return { ok: false, reason: `${python} does not run (${r.error.message})` };
  if (r.status !== 0) {
    const missing = r.stderr.trim().split('\n').at(-1) || `exit ${r.status}`;
    return { ok: false, reason: `${python} lacks ${missing}` };
  }
  return { ok: true };
}
