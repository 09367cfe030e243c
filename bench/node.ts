/**
 * The bench page's suites under Node, for `pnpm bench --adapter node-lavapipe25`: the engine on
 * the `webgpu` package's Dawn over Vulkan, pointed at Mesa 25's lavapipe by the driver, and the
 * models suite's transformers.js peer on onnxruntime-node's WebGPU execution provider (its own
 * Dawn, the same driver), in one process.
 *
 * Why a Node run beside the pages: no browser adapter here has shader-f16. Chromium filters
 * lavapipe out of its core adapters and its compatibility adapter has no f16, so in a page the
 * transformers.js fp16 peer and the f16 kernels never run. Under Node, Dawn takes lavapipe's
 * Vulkan device as it is, f16 included. The cases, timing and records are the page's
 * (bench/kernels.ts, models.ts, peer.ts, train.ts); the peer shares the driver, not the device.
 *
 * Run by bench/run.ts as a child process (`node --import tsx bench/node.ts <spec.json>`): records
 * go to stdout as `[record] <json>` lines, status as `[bench] <text>`; a case that cannot run
 * makes the exit status 1 after the others ran.
 */
import { readFileSync } from 'node:fs';
import { register } from 'node:module';
import { join } from 'node:path';
import type { BenchModelId } from './cases.js';
import type { BenchRecord } from './record.js';

/** What the driver asks for (bench/run.ts writes it); the page's URL parameters, as a file. */
export interface NodeBenchSpec {
  readonly root: string;
  readonly adapterName: string;
  readonly suites: readonly string[];
  readonly quick: boolean;
  readonly only?: string;
  readonly shape?: string;
  readonly samples?: number;
  readonly kernelProfile: 'auto' | 'gpu' | 'cpu';
  readonly matmulStaging: 'auto' | 'workgroup' | 'direct';
  /** The ONNX exports' folder and the models exported there; absent: no peer. */
  readonly peer?: { readonly dir: string; readonly ids: readonly BenchModelId[] };
}

/**
 * Dawn's GPU object, also as `navigator.gpu` with Dawn's globals (GPUBufferUsage, ...), as a page
 * has them: TF.js's WebGPU backend, the kernels suite's baseline, refuses to start without
 * navigator.gpu even when it is handed a device. Kept alive by the context (createGpuContext's gpu).
 */
async function browserGpu(): Promise<GPU> {
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
  // The engine's modules import their WGSL as Vite's `?raw`; the hook must be in place before they load.
  register('../tools/raw-import-hooks.mjs', import.meta.url);
  const { createGpuContext, describeAdapter } = await import('@webtune/core');
  const { directorySource } = await import('@webtune/models');
  const { BENCH_MODELS } = await import('./cases.js');
  const status = (s: string) => console.log(`[bench] ${s}`);
  const failed: string[] = [];
  const ctx = await createGpuContext({
    gpu: await browserGpu(),
    kernelProfile: spec.kernelProfile,
    matmulStaging: spec.matmulStaging,
    label: 'bench',
  });
  const adapter = `${spec.adapterName}: ${describeAdapter(ctx)}`;
  status(`adapter ${adapter}`);
  const options = {
    adapter,
    quick: spec.quick,
    only: spec.only,
    shape: spec.shape,
    samples: spec.samples,
    report: (r: BenchRecord) => console.log(`[record] ${JSON.stringify(r)}`),
    status,
    source: (id: BenchModelId) => directorySource(join(spec.root, BENCH_MODELS[id].dir)),
    fail: (key: string, e: unknown) => {
      const message = e instanceof Error ? e.message : String(e);
      failed.push(`${key}: ${message}`);
      status(`${key} failed: ${message}`);
    },
  };
  const shaderF16 = ctx.features.shaderF16;
  try {
    if (spec.suites.includes('kernels')) await (await import('./kernels.js')).runKernelBenchmarks(ctx, options);
    if (spec.suites.includes('models')) await (await import('./models.js')).runModelBenchmarks(ctx, options);
    if (spec.suites.includes('models') && spec.peer) {
      const { runPeerBenchmarksNode } = await import('./peer.js');
      await runPeerBenchmarksNode(spec.peer.dir, spec.peer.ids, shaderF16, options);
    }
    if (spec.suites.includes('train')) await (await import('./train.js')).runTrainBenchmarks(ctx, options);
  } finally {
    ctx.destroy();
  }
  if (failed.length > 0) throw new Error(`${failed.length} case(s) could not run:\n${failed.join('\n')}`);
}

// Exit explicitly: Dawn's and onnxruntime's handles must not keep the process alive.
main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e instanceof Error ? e.message : String(e));
    process.exit(1);
  },
);
