/**
 * The driver's half of the generation peer (bench/peer.ts): ONNX exports of the bench models for
 * transformers.js, made by tools/export_onnx.py (which checks each against transformers before
 * it is used), and the URLs the page needs. Node only.
 *
 * Exports go to bench/.models/onnx/<model id>/ and are reused while their stamp (the source
 * weights' size and time, and the exporter's text) matches, like bench/bench_model.ts's model.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, sep } from 'node:path';
import { pythonHas } from '../tools/python.js';
import { BENCH_MODELS, type BenchModelId, GENERATED_MODELS_DIR, type PeerLocation } from './cases.js';

export const PEER_DIR = `${GENERATED_MODELS_DIR}/onnx`;
const EXPORTER = 'tools/export_onnx.py';

/** onnxruntime-web's files as transformers.js resolves them (pnpm keeps it under .pnpm). */
function ortDist(root: string): string {
  const transformers = realpathSync(join(root, 'node_modules/@huggingface/transformers/package.json'));
  const entry = createRequire(transformers).resolve('onnxruntime-web');
  let dir = dirname(entry);
  while (!existsSync(join(dir, 'package.json'))) dir = dirname(dir);
  return join(dir, 'dist');
}

function stampOf(root: string, id: BenchModelId): string {
  const weights = statSync(join(root, BENCH_MODELS[id].dir, 'model.safetensors'));
  const script = createHash('sha256')
    .update(readFileSync(join(root, EXPORTER)))
    .digest('hex');
  return JSON.stringify({ size: weights.size, mtime: weights.mtimeMs, exporter: script });
}

/**
 * Exports every model in `ids` that has no current export, then returns where the page finds
 * them; or why there is no peer (no Python with torch, transformers and onnxruntime, or an export
 * that failed its check).
 */
export function ensurePeerExports(
  root: string,
  python: string | undefined,
  ids: readonly BenchModelId[],
): { location: PeerLocation } | { unavailable: string } {
  if (!python) return { unavailable: 'no Python found (set WEBTUNE_PYTHON or run `bash tools/setup-python.sh`)' };
  const has = pythonHas(python, ['torch', 'transformers', 'onnx', 'onnxruntime']);
  if (!has.ok) return { unavailable: `${has.reason} (run \`bash tools/setup-python.sh\`)` };
  for (const id of ids) {
    const out = join(root, PEER_DIR, id);
    const stamp = stampOf(root, id);
    const stampFile = join(out, '.stamp');
    if (existsSync(stampFile) && readFileSync(stampFile, 'utf8') === stamp) {
      console.log(`reusing the ONNX export of ${id} in ${PEER_DIR}/${id}`);
      continue;
    }
    console.log(`exporting ${id} to ONNX for transformers.js (${EXPORTER})`);
    rmSync(out, { recursive: true, force: true });
    const t0 = performance.now();
    const r = spawnSync(python, [EXPORTER, join(root, BENCH_MODELS[id].dir), out], {
      cwd: root,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    for (const line of r.stdout.split('\n')) if (line.trim()) console.log(`  ${line}`);
    if (r.status !== 0) {
      const tail = r.stderr.trim().split('\n').slice(-3).join(' | ');
      return { unavailable: `${EXPORTER} failed on ${id} (exit ${r.status}): ${tail}` };
    }
    writeFileSync(stampFile, stamp);
    console.log(`  ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  }
  const url = (path: string) => `/${relative(root, path).split(sep).join('/')}`;
  const dist = ortDist(root);
  return {
    location: {
      models: `${url(join(root, PEER_DIR))}/`,
      wasm: url(join(dist, 'ort-wasm-simd-threaded.asyncify.wasm')),
      mjs: url(join(dist, 'ort-wasm-simd-threaded.asyncify.mjs')),
    },
  };
}
