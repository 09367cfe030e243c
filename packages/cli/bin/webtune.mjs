#!/usr/bin/env node
// Runs the CLI's TypeScript sources directly: tsx for TypeScript, and tools/raw-import.mjs so the
// WGSL shaders import as text exactly as they do under Vite.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const tsx = pathToFileURL(require.resolve('tsx')).href;
const rawImport = pathToFileURL(join(here, '..', '..', '..', 'tools', 'raw-import.mjs')).href;
const main = join(here, '..', 'src', 'main.ts');
const env = { ...process.env, INIT_CWD: process.env.INIT_CWD ?? process.cwd() };
// Ctrl-C reaches the whole process group: the CLI itself saves a checkpoint and exits; this
// wrapper only waits for it (without a listener Node would die at once and orphan it).
process.on('SIGINT', () => {});
const r = spawnSync(process.execPath, ['--import', tsx, '--import', rawImport, main, ...process.argv.slice(2)], {
  stdio: 'inherit',
  env,
});
process.exit(r.status ?? 1);
