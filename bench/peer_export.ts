/**
 * The driver's half of the generation peer (bench/peer.ts): ONNX exports of the bench models for
 * transformers.js, made by tools/export_onnx.py (which checks each against transformers before
 * it is used), and the URLs the page needs. Node only.
 *
 * Exports go to bench/.models/onnx/<model id>/ and are reused while their stamp (the source's
 * weights and config, the exporter's text) matches, like bench/bench_model.ts's model. An export
 * that fails its check leaves the whole run without the peer (with the reason printed).
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
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

/** What an export is made from: the source's weights and config, and the exporter's text (a
 * content hash, so a fresh checkout of the same files reuses it). */
function stampOf(root: string, id: BenchModelId): string {
  const hash = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
  const dir = join(root, BENCH_MODELS[id].dir);
  return JSON.stringify({
    weights: hash(join(dir, 'model.safetensors')),
    config: hash(join(dir, 'config.json')),
    exporter: hash(join(root, EXPORTER)),
  });
}

/** The files the page loads (both precisions: the exporter's default). */
const EXPORTED = ['config.json', 'onnx/model.onnx', 'onnx/model_fp16.onnx'];

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
  const has = pythonHas(python, ['torch', 'transformers', 'onnx', 'onnxscript', 'onnxruntime']);
  if (!has.ok) return { unavailable: `${has.reason} (run \`bash tools/setup-python.sh\`)` };
  for (const id of ids) {
    const out = join(root, PEER_DIR, id);
    const stamp = stampOf(root, id);
    const stampFile = join(out, '.stamp');
    const whole = EXPORTED.every((f) => existsSync(join(out, f)));
    if (whole && existsSync(stampFile) && readFileSync(stampFile, 'utf8') === stamp) {
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
      // The tracer's warnings run long; the default 1 MiB would cut the child off.
      maxBuffer: 64 * 2 ** 20,
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
