/**
 * The driver's half of the generation peer (bench/peer.ts): ONNX exports of the bench models for
 * transformers.js, made by tools/export_onnx.py (which checks each against transformers before
 * it is used), and the URLs the page needs. Node only.
 *
 * Exports go to bench/.models/onnx/<model id>/ and are reused while their stamp (the source's
 * weights and config, the exporter's text, the versions of the Python packages that make it)
 * matches, like bench/bench_model.ts's model. A model whose export fails its check runs without
 * the peer (the reason is printed); the other models keep theirs.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, sep } from 'node:path';
import { pythonHas } from '../tools/python.js';
import { BENCH_MODELS, type BenchModelId, GENERATED_MODELS_DIR, type PeerLocation } from './cases.js';
import { runChild } from './child.js';

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

/** The packages the exporter runs on: another torch traces another graph. */
const EXPORT_PACKAGES = ['torch', 'transformers', 'onnx', 'onnxscript', 'onnxruntime'];

/** The versions of EXPORT_PACKAGES in `python`, as one string. */
function packageVersions(python: string): string {
  const code = `import importlib.metadata as m; print(" ".join(p + "=" + m.version(p) for p in ${JSON.stringify(EXPORT_PACKAGES)}))`;
  const r = spawnSync(python, ['-c', code], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${python} could not report its package versions: ${r.stderr.trim()}`);
  return r.stdout.trim();
}

/** What an export is made from: the source's weights and config, the exporter's text (content
 * hashes, so a fresh checkout of the same files reuses it) and the packages' versions. */
function stampOf(root: string, id: BenchModelId, versions: string): string {
  const hash = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
  const dir = join(root, BENCH_MODELS[id].dir);
  return JSON.stringify({
    weights: hash(join(dir, 'model.safetensors')),
    config: hash(join(dir, 'config.json')),
    exporter: hash(join(root, EXPORTER)),
    versions,
  });
}

/** The files the page loads (both precisions: the exporter's default). */
const EXPORTED = ['config.json', 'onnx/model.onnx', 'onnx/model_fp16.onnx'];

/**
 * Exports every model in `ids` that has no current export, then returns where the page finds
 * them, with the models whose export failed and why; or why there is no peer at all (no Python
 * with the exporter's packages, or no model exported).
 */
export async function ensurePeerExports(
  root: string,
  python: string | undefined,
  ids: readonly BenchModelId[],
): Promise<{ location: PeerLocation; failed: [BenchModelId, string][] } | { unavailable: string }> {
  if (!python) return { unavailable: 'no Python found (set WEBTUNE_PYTHON or run `bash tools/setup-python.sh`)' };
  const has = pythonHas(python, EXPORT_PACKAGES);
  if (!has.ok) return { unavailable: `${has.reason} (run \`bash tools/setup-python.sh\`)` };
  const versions = packageVersions(python);
  const exported: BenchModelId[] = [];
  const failed: [BenchModelId, string][] = [];
  for (const id of ids) {
    const out = join(root, PEER_DIR, id);
    const stamp = stampOf(root, id, versions);
    const stampFile = join(out, '.stamp');
    const whole = EXPORTED.every((f) => existsSync(join(out, f)));
    if (whole && existsSync(stampFile) && readFileSync(stampFile, 'utf8') === stamp) {
      console.log(`reusing the ONNX export of ${id} in ${PEER_DIR}/${id}`);
      exported.push(id);
      continue;
    }
    console.log(`exporting ${id} to ONNX for transformers.js (${EXPORTER}; ${versions})`);
    rmSync(out, { recursive: true, force: true });
    const t0 = performance.now();
    const r = await runChild(python, [EXPORTER, join(root, BENCH_MODELS[id].dir), out], root);
    if (r.code !== 0) {
      const tail = r.stderr.trim().split('\n').slice(-3).join(' | ');
      failed.push([id, `${EXPORTER} failed on ${id} (exit ${r.code}): ${tail}`]);
      rmSync(out, { recursive: true, force: true });
      continue;
    }
    writeFileSync(stampFile, stamp);
    exported.push(id);
    console.log(`  ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  }
  if (exported.length === 0) return { unavailable: failed.map(([, why]) => why).join('; ') || 'no model to export' };
  const url = (path: string) => `/${relative(root, path).split(sep).join('/')}`;
  const dist = ortDist(root);
  return {
    failed,
    location: {
      ids: exported,
      models: `${url(join(root, PEER_DIR))}/`,
      wasm: url(join(dist, 'ort-wasm-simd-threaded.asyncify.wasm')),
      mjs: url(join(dist, 'ort-wasm-simd-threaded.asyncify.mjs')),
    },
  };
}
