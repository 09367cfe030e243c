/**
 * The benchmark page. Opened by bench/run.ts in headless Chromium (or by hand in any browser:
 * /bench/index.html?quick=1&suite=kernels,models,train). Records go to the table and, when run by
 * the driver, to Node. A case of the models/train suites that cannot run is logged and the others
 * go on; the page then ends with an error naming the failed cases.
 */
import { createGpuContext, describeAdapter } from '@webtune/core';
import { urlSource } from '@webtune/models';
import { BENCH_MODELS, type BenchModelId } from './cases.js';
import type { SuiteOptions } from './models.js';
import type { BenchRecord } from './record.js';
import { runSuites } from './suites.js';

declare global {
  interface Window {
    webtuneReport?: (r: BenchRecord) => void;
    webtuneDone?: (error?: string) => void;
  }
}

const params = new URLSearchParams(location.search);
const statusEl = document.getElementById('status') as HTMLElement;
const tbody = document.querySelector('#results tbody') as HTMLElement;

/** ?samples=N (bench/run.ts checks --samples): a whole number of rounds from 6 to 200, or none. */
function samplesParam(v: string | null): number | undefined {
  if (v === null) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 6 || n > 200) throw new Error(`samples=${v}: a whole number from 6 to 200`);
  return n;
}

function status(s: string): void {
  statusEl.textContent = s;
  console.log(`[bench] ${s}`);
}

function show(r: BenchRecord): void {
  const row = document.createElement('tr');
  const cells = [
    r.name,
    r.shape,
    r.ms.toFixed(2),
    r.gflops?.toFixed(2) ?? '',
    r.baseline ?? '',
    r.ratio?.toFixed(2) ?? '',
  ];
  for (const c of cells) {
    const td = document.createElement('td');
    td.textContent = c;
    row.append(td);
  }
  tbody.append(row);
  window.webtuneReport?.(r);
}

async function main(): Promise<void> {
  const featureLevel = params.get('featureLevel') === 'compatibility' ? 'compatibility' : 'core';
  // --kernels: the kernel profile forced (the GPUs' plan on a software adapter), else measured.
  const forced = params.get('kernels');
  const kernelProfile = forced === 'gpu' || forced === 'cpu' ? forced : 'auto';
  // --staging: how the tiled matmuls read their operands, forced, else measured.
  const staging = params.get('staging');
  const matmulStaging = staging === 'workgroup' || staging === 'direct' ? staging : 'auto';
  const ctx = await createGpuContext({ featureLevel, kernelProfile, matmulStaging, label: 'bench' });
  const adapter = `${params.get('adapterName') ?? 'browser'}: ${describeAdapter(ctx)}`;
  status(`adapter ${adapter}`);
  const suites = (params.get('suite') ?? 'kernels').split(',');
  const options = {
    adapter,
    quick: params.has('quick'),
    only: params.get('only') ?? undefined,
    shape: params.get('shape') ?? undefined,
    samples: samplesParam(params.get('samples')),
    report: show,
    status,
    // The driver serves the repository: each model's folder from this page's server.
    source: (id: BenchModelId) => urlSource(new URL(`/${BENCH_MODELS[id].dir}/`, location.origin).href),
  };
  const peerModels = params.get('peerModels');
  const peer = peerModels
    ? async (o: SuiteOptions) => {
        const { runPeerBenchmarks } = await import('./peer.js');
        await runPeerBenchmarks(
          {
            ids: (params.get('peerIds') ?? '').split(',').filter((id) => id !== '') as BenchModelId[],
            models: peerModels,
            wasm: params.get('ortWasm') ?? '',
            mjs: params.get('ortMjs') ?? '',
          },
          featureLevel,
          o,
        );
      }
    : undefined;
  await runSuites(ctx, suites, options, peer);
  status('done');
}

main().then(
  () => window.webtuneDone?.(),
  (e: unknown) => {
    status(`failed: ${String(e)}`);
    window.webtuneDone?.(e instanceof Error ? `${e.message}\n${e.stack}` : String(e));
  },
);
