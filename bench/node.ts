/**
 * The bench page's suites under Node, for `pnpm bench --adapter node-lavapipe25`: the engine on
 * the `webgpu` package's Dawn over Vulkan, pointed at Mesa 25's lavapipe by the driver, and the
 * models suite's transformers.js peer on onnxruntime-node's WebGPU execution provider (its own
 * Dawn, on the same driver: the only Vulkan driver the process is given), in one process.
 *
 * Why a Node run beside the pages: no browser adapter here has shader-f16. Chromium filters
 * lavapipe out of its core adapters and its compatibility adapter has no f16, so in a page the
 * transformers.js fp16 peer and the f16 kernels never run. Under Node, Dawn takes lavapipe's
 * Vulkan device as it is, f16 included. The cases, timing and records are the page's
 * (bench/suites.ts). The figures compare with each other, not with a page's: the engine runs on
 * Dawn's Vulkan backend at the core feature level, the page's lavapipe on its OpenGL ES backend
 * through ANGLE; and the peer shares the driver, not the device.
 *
 * Run by bench/run.ts as a child process (`node --import tsx bench/node.ts <spec.json>`): records
 * go to stdout as `[record] <json>` lines, status as `[bench] <text>`, and a last `[done]` line
 * says the run ended (the page's webtuneDone); a case that cannot run makes the exit status 1
 * after the others ran.
 */
import { readFileSync } from 'node:fs';
import { register } from 'node:module';
import { join } from 'node:path';
import type { BenchModelId } from './cases.js';
import type { NodeBenchSpec } from './record.js';

/**
 * Dawn's GPU object for the engine's context, also set as `navigator.gpu` with Dawn's globals
 * (GPUBufferUsage, ...), as a page has them: TF.js's WebGPU backend, the kernels suite's
 * baseline, refuses to start without navigator.gpu even when it is handed a device. The context
 * keeps the object alive (createGpuContext's gpu).
 */
async function dawnAsNavigatorGpu(): Promise<GPU> {
  const dawn = (await import('webgpu')) as unknown as { create(flags: string[]): GPU; globals: object };
  for (const [key, value] of Object.entries(dawn.globals))
    if (!(key in globalThis)) Object.assign(globalThis, { [key]: value });
  const gpu = dawn.create([]);
  // Node 20 has no navigator; later Nodes have one without gpu.
  if (typeof navigator === 'undefined')
    Object.defineProperty(globalThis, 'navigator', { value: { gpu }, configurable: true });
  else if (!('gpu' in navigator)) Object.defineProperty(navigator, 'gpu', { value: gpu, configurable: true });
  return gpu;
}

async function main(): Promise<void> {
  const specFile = process.argv[2];
  if (!specFile) throw new Error('usage: node --import tsx bench/node.ts <spec.json>');
  const spec = JSON.parse(readFileSync(specFile, 'utf8')) as NodeBenchSpec;
  // The engine's modules import their WGSL as Vite's `?raw`: the hook goes in before they load.
  register('../tools/raw-import-hooks.mjs', import.meta.url);
  const { createGpuContext, describeAdapter } = await import('@webtune/core');
  const { directorySource } = await import('@webtune/models');
  const { BENCH_MODELS } = await import('./cases.js');
  const { runSuites } = await import('./suites.js');
  const status = (s: string) => console.log(`[bench] ${s}`);
  const ctx = await createGpuContext({
    gpu: await dawnAsNavigatorGpu(),
    kernelProfile: spec.kernelProfile,
    matmulStaging: spec.matmulStaging,
    label: 'bench',
  });
  const adapter = `${spec.adapterName}: ${describeAdapter(ctx)}`;
  status(`adapter ${adapter}`);
  const shaderF16 = ctx.features.shaderF16;
  const peer = spec.peer;
  await runSuites(
    ctx,
    spec.suites,
    {
      adapter,
      quick: spec.quick,
      only: spec.only,
      shape: spec.shape,
      samples: spec.samples,
      report: (r) => console.log(`[record] ${JSON.stringify(r)}`),
      status,
      source: (id: BenchModelId) => directorySource(join(spec.root, BENCH_MODELS[id].dir)),
    },
    peer ? async (o) => (await import('./peer.js')).runPeerBenchmarksNode(peer.dir, peer.ids, shaderF16, o) : undefined,
  );
}

/** Exits once stdout and stderr have taken everything written to them: writes to a pipe are
 * asynchronous, and process.exit would drop the last records. */
function exitFlushed(code: number): void {
  let open = 2;
  const done = () => {
    if (--open === 0) process.exit(code);
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
}

// Exit explicitly: Dawn's and onnxruntime's handles must not keep the process alive.
main().then(
  () => {
    console.log('[done]');
    exitFlushed(0);
  },
  (e: unknown) => {
    console.error(e instanceof Error ? (e.stack ?? e.message) : String(e));
    exitFlushed(1);
  },
);
