/**
 * `pnpm bench [--suite kernels,models,train|all] [--json out.json]
 *  [--adapter swiftshader,lavapipe,lavapipe25,node-lavapipe25|gpu] [--quick] [--only <substring>]
 *  [--shape <substring>] [--samples N] [--no-baseline] [--no-peer] [--timeout-min N]
 *  [--kernels auto|gpu|cpu] [--staging auto|workgroup|direct] [--chromium-flag=--some-flag ...]`
 *
 * Runs the suites once per adapter: for a browser adapter it serves the repository with Vite and
 * opens bench/index.html in headless Chromium; for node-lavapipe25 it runs the same suites in a
 * Node child process (bench/node.ts). It collects the records, prints a table and writes them as a
 * JSON array. Adapters (tools/chromium.ts): Chromium's SwiftShader; lavapipe, the system's Mesa
 * through ANGLE in compatibility mode; lavapipe25, the same over Mesa 25's lavapipe (unpacked by
 * tools/setup.mjs), whose compute pipelines are not compiled again at every dispatch as Mesa 22's
 * are; gpu; and node-lavapipe25: the `webgpu` package's Dawn over Vulkan on Mesa 25's lavapipe,
 * with transformers.js on onnxruntime-node's WebGPU provider, the one adapter here with
 * shader-f16, so the f16 kernels and transformers.js fp16 run there. Its figures compare with each
 * other, not with a page's (another Dawn backend; see bench/node.ts). Suites:
 * - kernels (the default): matmul and the fused LoRA layer against TF.js / unfused dispatches on
 *   the same device (bench/kernels.ts);
 * - models: prefill and decode tokens/s on stories260K and a random SmolLM2-135M-shaped model
 *   (bench/models.ts), then the same cases through transformers.js in the same page (or process),
 *   fp32 and fp16, from ONNX exports of the same weights (bench/peer.ts; the driver exports them
 *   with tools/export_onnx.py, bench/peer_export.ts; --no-peer skips it);
 * - train: LoRA training tokens/s and GPU bytes on the same two models (bench/train.ts).
 * For models and train the driver first writes the random model (bench/bench_model.ts, into
 * bench/.models/, reused while its stamp matches), then runs tools/bench_torch.py with the Python
 * that tools/python.ts finds ($WEBTUNE_PYTHON, else the repository's .venv or tools/.venv, else
 * python3 on PATH) on the same cases and token ids (bench/cases.ts), and merges its figures into
 * the records: baseline torch_cpu (inference) or torch_peft_cpu (training), ratio = baseline
 * ms / ms (above 1: webtune is faster). Without a Python that has torch, transformers and peft (or
 * with --no-baseline) the baseline is null and a note says why. --quick runs small variants of
 * every case (a few minutes per adapter). --shape keeps the kernel cases whose shape label (the
 * table's shape column) contains it, to give the cases still unsettled more rounds. Kernel ratios
 * come with their spread: the median and quartiles of the rounds' own ratios and a sign test
 * (p < 0.05: the rounds agree on which side of 1 it is); --samples N (6 to 200) runs N rounds per
 * kernel case instead of up to 7 in a time budget (give a --timeout-min to match), and N samples
 * of every generation case on each engine, whose ratio against transformers.js then comes with a
 * rank-sum test of the two engines' samples. Benchmarks never pass or fail on their figures; the
 * command fails only when a benchmark cannot run (the table and JSON of what did run are still
 * written). --kernels gpu plans the GPUs' kernel configurations and fusions on any adapter (the
 * kernel profile, as the tests force it; default auto: measured), so a software adapter runs, and
 * counts, the step a GPU would take; cpu the CPU adapters'. --staging forces how the tiled matmuls
 * read their operands (createGpuContext's matmulStaging; default auto: measured on CPU adapters),
 * to run the same case both ways. --chromium-flag applies to the browser adapters only.
 */

import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { register } from 'node:module';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright';
import { createServer, type ViteDevServer } from 'vite';
import {
  CHROMIUM_ADAPTERS,
  type ChromiumAdapter,
  chromiumEnv,
  chromiumFeatureLevel,
  chromiumPath,
  chromiumWebGpuArgs,
  lavapipe25Env,
} from '../tools/chromium.js';
import { findPython } from '../tools/python.js';
import {
  BENCH_MODELS,
  casesByModel,
  inferenceCases,
  PEER_DTYPES,
  type PeerLocation,
  promptIds,
  TRAIN_HYPER,
  trainCases,
  trainIds,
} from './cases.js';
import { runChild, runLines } from './child.js';
import { rankSumP } from './measure.js';
import type { BenchRecord, NodeBenchSpec } from './record.js';

const SUITES = ['kernels', 'models', 'train'];

/** Adapters run under Node instead of a page (bench/node.ts). */
const NODE_ADAPTERS = ['node-lavapipe25'] as const;
type NodeAdapter = (typeof NODE_ADAPTERS)[number];
type BenchAdapter = ChromiumAdapter | NodeAdapter;
const ADAPTERS: readonly string[] = [...CHROMIUM_ADAPTERS, ...NODE_ADAPTERS];
const isNodeAdapter = (a: BenchAdapter): a is NodeAdapter => (NODE_ADAPTERS as readonly string[]).includes(a);

interface Args {
  json?: string;
  adapters: BenchAdapter[];
  quick: boolean;
  suites: string[];
  extraFlags: string[];
  /** Per adapter; default from the suites (see defaultTimeoutMin). */
  timeoutMs?: number;
  only?: string;
  /** Kernel cases whose shape label contains this (BenchOptions.shape). */
  shape?: string;
  /** Rounds per kernel case, samples per generation case (BenchOptions.samples). */
  samples?: number;
  baseline: boolean;
  peer: boolean;
  /** The kernel profile (createGpuContext's kernelProfile); default auto. */
  kernels: 'auto' | 'gpu' | 'cpu';
  /** How the tiled matmuls read their operands (createGpuContext's matmulStaging); default auto. */
  staging: 'auto' | 'workgroup' | 'direct';
}

function parseArgs(argv: string[]): Args {
  const args: Args = {
    adapters: ['swiftshader', 'lavapipe'],
    quick: false,
    suites: ['kernels'],
    extraFlags: [],
    baseline: true,
    peer: true,
    kernels: 'auto',
    staging: 'auto',
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const value = () => {
      const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a.startsWith('--json')) args.json = value();
    else if (a.startsWith('--adapter')) args.adapters = value().split(',') as BenchAdapter[];
    else if (a === '--quick') args.quick = true;
    else if (a.startsWith('--suite')) {
      const v = value();
      args.suites = v === 'all' ? [...SUITES] : v.split(',');
    } else if (a === '--no-baseline') args.baseline = false;
    else if (a === '--no-peer') args.peer = false;
    else if (a.startsWith('--only')) args.only = value();
    else if (a.startsWith('--shape')) args.shape = value();
    else if (a.startsWith('--samples')) {
      args.samples = Number(value());
      // Below 6 rounds the sign test cannot reach p < 0.05 (its best is 2^(1−n)).
      if (!Number.isInteger(args.samples) || args.samples < 6 || args.samples > 200)
        throw new Error('--samples needs a whole number from 6 to 200');
    } else if (a.startsWith('--chromium-flag')) args.extraFlags.push(value());
    else if (a.startsWith('--timeout-min')) args.timeoutMs = Number(value()) * 60_000;
    else if (a.startsWith('--kernels')) {
      const v = value();
      if (v !== 'auto' && v !== 'gpu' && v !== 'cpu') throw new Error(`--kernels ${v}: use auto, gpu or cpu`);
      args.kernels = v;
    } else if (a.startsWith('--staging')) {
      const v = value();
      if (v !== 'auto' && v !== 'workgroup' && v !== 'direct')
        throw new Error(`--staging ${v}: use auto, workgroup or direct`);
      args.staging = v;
    } else if (a === '--') continue;
    else throw new Error(`unknown argument ${a}`);
  }
  for (const ad of args.adapters) {
    if (!ADAPTERS.includes(ad)) throw new Error(`unknown adapter ${ad}: use ${ADAPTERS.join(', ')}`);
  }
  for (const suite of args.suites) {
    if (!SUITES.includes(suite)) throw new Error(`unknown suite ${suite}: use ${SUITES.join(', ')} or all`);
  }
  if (args.shape !== undefined && !args.suites.includes('kernels'))
    throw new Error('--shape filters kernel cases: it needs the kernels suite (--suite kernels)');
  return args;
}

/** Default time limit per adapter: long enough for the full suites on SwiftShader. */
function defaultTimeoutMin(args: Args): number {
  const per: Record<string, number> = args.quick
    ? { kernels: 15, models: 15, train: 15 }
    : { kernels: 45, models: args.peer ? 90 : 45, train: 120 };
  return args.suites.reduce((n, s) => n + (per[s] ?? 0), 0);
}

const fmt = (x: number | null | undefined, digits = 2) =>
  x === null || x === undefined || !Number.isFinite(x) ? '' : x.toFixed(digits);
const num = (r: BenchRecord, key: string): number | undefined => {
  const v = r.extra?.[key];
  return typeof v === 'number' ? v : undefined;
};
const mib = (bytes: number | undefined) => (bytes === undefined ? '' : (bytes / 2 ** 20).toFixed(1));

/** A kernel ratio's spread (bench/measure.ts RatioSpread): "the rounds' median (q1–q3), sign test
 * p, rounds (ties)", or '' without one. */
function spread(r: BenchRecord): string {
  const [med, q1, q3, p] = [
    num(r, 'ratio_paired_median'),
    num(r, 'ratio_q1'),
    num(r, 'ratio_q3'),
    num(r, 'ratio_sign_p'),
  ];
  if (med === undefined || q1 === undefined || q3 === undefined || p === undefined) return '';
  const ties = num(r, 'ratio_ties') ?? 0;
  return (
    `${fmt(med)} (${fmt(q1)}–${fmt(q3)}), p ${p < 0.001 ? '<0.001' : p.toFixed(3)}, n ${num(r, 'samples')}` +
    (ties > 0 ? ` (${ties} tied)` : '')
  );
}

function render(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ')).join('\n');
}

function table(records: BenchRecord[]): string {
  const rows = [
    ['name', 'shape', 'ms', 'GFLOP/s', 'tok/s', 'baseline', 'baseline ms', 'base tok/s', 'ratio', 'spread', 'adapter'],
  ];
  for (const r of records) {
    const tps = num(r, 'tokens_per_s');
    const engine = r.extra?.engine;
    rows.push([
      typeof engine === 'string' ? `${r.name} (${engine})` : r.name,
      r.shape,
      fmt(r.ms),
      fmt(r.gflops),
      fmt(tps, 1),
      r.baseline ?? (typeof r.extra?.baseline_note === 'string' ? '(none)' : ''),
      fmt(r.baselineMs),
      fmt(num(r, 'baseline_tokens_per_s'), 1),
      fmt(r.ratio),
      spread(r),
      r.adapter,
    ]);
  }
  return render(rows);
}

/** Training memory: webtune's GPU bytes against PyTorch's CPU accounting (tools/bench_torch.py). */
function memoryTable(records: BenchRecord[]): string | undefined {
  const train = records.filter((r) => num(r, 'peak_gpu_bytes') !== undefined);
  if (train.length === 0) return undefined;
  const rows = [
    [
      'shape',
      'webtune GPU MiB',
      '(frozen/train/act/scratch)',
      'torch peak MiB',
      '(persistent+transient)',
      'torch RSS Δ MiB',
      'torch/webtune',
      'adapter',
    ],
  ];
  for (const r of train) {
    const peak = num(r, 'peak_gpu_bytes');
    const base = num(r, 'baseline_peak_bytes');
    rows.push([
      r.shape,
      mib(peak),
      ['frozen_bytes', 'trainable_bytes', 'activation_bytes', 'scratch_bytes'].map((k) => mib(num(r, k))).join('/'),
      mib(base),
      base === undefined
        ? ''
        : `${mib(num(r, 'baseline_persistent_bytes'))}+${mib(num(r, 'baseline_transient_peak_bytes'))}`,
      mib(num(r, 'baseline_rss_peak_delta')),
      base !== undefined && peak ? fmt(base / peak) : '',
      r.adapter,
    ]);
  }
  return render(rows);
}

/** What a training step or a decoded token costs in GPU work: exact runtime counts. */
function countsTable(records: BenchRecord[]): string | undefined {
  const counted = records.filter((r) => r.dispatchesPerStep !== undefined || r.dispatchesPerToken !== undefined);
  if (counted.length === 0) return undefined;
  const rows = [['name', 'shape', 'dispatches', 'submits', 'blocking readbacks', 'GPU MiB (peak live)', 'adapter']];
  const n = (x: number | undefined) => (x === undefined ? '' : String(x));
  for (const r of counted) {
    const perToken = r.dispatchesPerToken !== undefined;
    rows.push([
      r.name,
      r.shape,
      perToken ? `${r.dispatchesPerToken}/token` : `${r.dispatchesPerStep}/step`,
      n(r.submitsPerStep),
      n(r.blockingReadbacksPerStep),
      mib(r.gpuBytes),
      r.adapter,
    ]);
  }
  return render(rows);
}

/** A generation record's samples (extra.samples_ms, models.ts's samplesField). */
function samplesOf(r: BenchRecord): number[] {
  const field = r.extra?.samples_ms;
  return typeof field === 'string' && field ? field.split(',').map(Number) : [];
}

/** Generation beside transformers.js: each engine prefill/decode record with the peer's records of
 * the same case on the same adapter (bench/peer.ts); ratio = webtune tok/s / theirs. Also copies
 * the peer's tokens/s into the engine's record (extra.transformersjs_<dtype>_tokens_per_s). */
function peerTable(records: BenchRecord[]): string | undefined {
  const peers = records.filter((r) => typeof r.extra?.engine === 'string');
  if (peers.length === 0) return undefined;
  const head = ['name', 'shape', 'webtune tok/s', ...PEER_DTYPES.flatMap((d) => [`tjs ${d} tok/s`, 'ratio'])];
  const rows = [[...head, 'same greedy ids as torch (webtune; tjs)', 'adapter (webtune)', 'adapter (transformers.js)']];
  const tps = (x: number | undefined) => fmt(x, x !== undefined && x < 10 ? 3 : 1);
  const same = (r: BenchRecord | undefined) => String(r?.extra?.same_greedy_ids ?? '-');
  for (const r of records) {
    if (r.extra?.engine !== undefined || (r.name !== 'prefill' && r.name !== 'decode')) continue;
    const mine = num(r, 'tokens_per_s');
    const mates = PEER_DTYPES.map((d) =>
      peers.find(
        (q) => q.adapter === r.adapter && q.extra?.case === r.extra?.case && q.extra?.engine === `transformers.js ${d}`,
      ),
    );
    const cells = mates.flatMap((p, i) => {
      const theirs = p && num(p, 'tokens_per_s');
      if (theirs !== undefined && r.extra) r.extra[`transformersjs_${PEER_DTYPES[i]}_tokens_per_s`] = theirs;
      const ratio = mine !== undefined && theirs ? fmt(mine / theirs) : '';
      // Each engine's samples were taken in a row, not in pairs: a rank-sum test says whether
      // they settle which is faster (p < 0.05), given 3 or more a side.
      const ours = samplesOf(r);
      const peer = p ? samplesOf(p) : [];
      if (ratio && ours.length >= 3 && peer.length >= 3) {
        const pValue = rankSumP(ours, peer);
        if (r.extra) r.extra[`transformersjs_${PEER_DTYPES[i]}_rank_sum_p`] = pValue;
        return [
          tps(theirs),
          `${ratio} (p ${pValue < 0.001 ? '<0.001' : pValue.toFixed(3)}, n ${ours.length}+${peer.length})`,
        ];
      }
      return [tps(theirs), ratio];
    });
    const ids = r.name === 'decode' ? `${same(r)}; ${mates.map(same).join(', ')}` : '';
    const peerAdapter = mates.find((p) => typeof p?.extra?.peer_adapter === 'string')?.extra?.peer_adapter;
    rows.push([r.name, r.shape, tps(mine), ...cells, ids, r.adapter, String(peerAdapter ?? '')]);
  }
  return render(rows);
}

// ---------------------------------------------------------------------------------------------
// PyTorch baseline (tools/bench_torch.py)

interface TorchResult {
  ms: number;
  ids?: number[];
  first_loss?: number;
  peak_bytes?: number;
  persistent_bytes?: number;
  transient_peak_bytes?: number;
  rss_peak_delta?: number | null;
}

interface TorchRun {
  env?: Record<string, string | number>;
  results: Record<string, TorchResult>;
  errors: Record<string, string>;
  /** Set when there is no baseline at all. */
  unavailable?: string;
}

async function runTorchBaseline(root: string, args: Args): Promise<TorchRun> {
  const models = args.suites.includes('models');
  const train = args.suites.includes('train');
  const keep = (key: string) => !args.only || key.includes(args.only);
  if (!args.baseline) return { results: {}, errors: {}, unavailable: '--no-baseline' };
  const python = findPython(root);
  if (!python) {
    const why = 'no Python found (set WEBTUNE_PYTHON or run `bash tools/setup-python.sh`)';
    console.log(`note: PyTorch baseline skipped: ${why}; baselines are null`);
    return { results: {}, errors: {}, unavailable: why };
  }
  const spec = {
    models: Object.fromEntries(Object.values(BENCH_MODELS).map((m) => [m.id, join(root, m.dir)])),
    inference: models
      ? inferenceCases(args.quick)
          .filter((c) => keep(c.key))
          .map((c) => ({
            key: c.key,
            kind: c.kind,
            model: c.model,
            prompt_ids: promptIds(c),
            new_tokens: c.newTokens,
            min_samples: c.minSamples,
            max_samples: c.maxSamples,
            budget_ms: c.budgetMs,
          }))
      : [],
    train: train
      ? trainCases(args.quick)
          // PyTorch trains on the f32 base: the baseline of the f16 cases only.
          .filter((c) => keep(c.key) && c.precision === 'f16')
          .map((c) => ({
            key: c.key,
            model: c.model,
            r: c.r,
            alpha: c.alpha,
            targets: c.targets,
            batch: c.batch,
            seq: c.seq,
            ids: trainIds(c),
            warmup_steps: c.warmupSteps,
            min_steps: c.minSteps,
            max_steps: c.maxSteps,
            budget_ms: c.budgetMs,
            hyper: TRAIN_HYPER,
          }))
      : [],
  };
  const dir = mkdtempSync(join(tmpdir(), 'webtune-bench-'));
  try {
    writeFileSync(join(dir, 'spec.json'), JSON.stringify(spec));
    console.log(`PyTorch CPU baseline (${python})`);
    const { code, stderr } = await runChild(
      python,
      ['tools/bench_torch.py', '--spec', join(dir, 'spec.json'), '--out', join(dir, 'torch.json')],
      root,
    );
    if (code !== 0 || !existsSync(join(dir, 'torch.json'))) {
      const tail = stderr.trim().split('\n').slice(-3).join(' | ');
      const why = `tools/bench_torch.py exited with ${code}: ${tail}`;
      console.log(`note: PyTorch baseline unavailable: ${why}; baselines are null`);
      return { results: {}, errors: {}, unavailable: why };
    }
    return JSON.parse(readFileSync(join(dir, 'torch.json'), 'utf8')) as TorchRun;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Fills a models/train record's baseline from the PyTorch run of the same case. */
function mergeBaseline(r: BenchRecord, torch: TorchRun | undefined): BenchRecord {
  const key = r.extra?.case;
  if (typeof key !== 'string' || !r.extra) return r;
  const extra = r.extra;
  const ids = typeof extra.ids === 'string' ? extra.ids.split(',').map(Number) : undefined;
  delete extra.ids;
  const b = torch?.results[key];
  if (!torch || !b) {
    extra.baseline_note = torch?.unavailable ?? torch?.errors[key] ?? 'no PyTorch result for this case';
    return r;
  }
  const train = r.name === 'lora_train_step';
  r.baseline = train ? 'torch_peft_cpu' : 'torch_cpu';
  r.baselineMs = b.ms;
  r.ratio = b.ms / r.ms;
  const tps = typeof extra.tokens_per_s === 'number' ? extra.tokens_per_s : undefined;
  if (tps !== undefined) extra.baseline_tokens_per_s = (tps * r.ms) / b.ms;
  if (ids && b.ids) {
    let same = 0;
    while (same < ids.length && ids[same] === b.ids[same]) same++;
    extra.same_greedy_ids = `${same}/${ids.length}`;
  }
  if (train) {
    if (b.first_loss !== undefined) extra.baseline_first_loss = b.first_loss;
    if (b.peak_bytes !== undefined) extra.baseline_peak_bytes = b.peak_bytes;
    if (b.persistent_bytes !== undefined) extra.baseline_persistent_bytes = b.persistent_bytes;
    if (b.transient_peak_bytes !== undefined) extra.baseline_transient_peak_bytes = b.transient_peak_bytes;
    if (typeof b.rss_peak_delta === 'number') extra.baseline_rss_peak_delta = b.rss_peak_delta;
  }
  if (torch.env) extra.baseline_env = `torch ${torch.env.torch}, ${torch.env.threads} threads`;
  return r;
}

// ---------------------------------------------------------------------------------------------

/** A record from a page or a Node run: its baseline merged in, kept, written and printed. */
function keepRecord(r: BenchRecord, args: Args, torch: TorchRun | undefined, records: BenchRecord[]): void {
  records.push(mergeBaseline(r, torch));
  // Written as they come, so a long run that is stopped keeps what it measured.
  if (args.json) writeFileSync(args.json, `${JSON.stringify(records, null, 2)}\n`);
  const tps = num(r, 'tokens_per_s');
  const btps = num(r, 'baseline_tokens_per_s');
  const peak = num(r, 'peak_gpu_bytes');
  const basePeak = num(r, 'baseline_peak_bytes');
  console.log(
    `  ${r.name} ${r.shape}: ${r.ms.toFixed(2)} ms` +
      (tps === undefined ? '' : ` (${tps.toFixed(1)} tok/s)`) +
      (r.ratio === null
        ? ''
        : `, ratio ${r.ratio.toFixed(2)}${spread(r) ? ` (${spread(r)})` : ''} vs ${r.baseline}${btps === undefined ? '' : ` (${btps.toFixed(1)} tok/s)`}`) +
      (peak === undefined ? '' : `; GPU ${mib(peak)} MiB`) +
      (r.dispatchesPerStep === undefined
        ? ''
        : `; ${r.dispatchesPerStep} dispatches, ${r.submitsPerStep} submits, ${r.blockingReadbacksPerStep} blocking readbacks per step`) +
      (r.dispatchesPerToken === undefined ? '' : `; ${r.dispatchesPerToken} dispatches per token`) +
      (basePeak === undefined ? '' : `, torch ${mib(basePeak)} MiB`),
  );
}

async function runAdapter(
  url: string,
  adapter: ChromiumAdapter,
  args: Args,
  torch: TorchRun | undefined,
  peer: PeerLocation | undefined,
  records: BenchRecord[],
): Promise<void> {
  const browser = await chromium.launch({
    executablePath: chromiumPath(),
    args: [...chromiumWebGpuArgs(adapter), ...args.extraFlags],
    env: chromiumEnv(adapter),
    headless: true,
  });
  try {
    const page = await browser.newPage();
    page.on('console', (m) => {
      const text = m.text();
      if (text.startsWith('[bench]')) console.log(`  ${adapter}: ${text.slice(8)}`);
      else if (m.type() === 'error') console.error(`  ${adapter} console error: ${text}`);
      else if (m.type() === 'warning') console.error(`  ${adapter} console warning: ${text}`);
    });
    page.on('pageerror', (e) => console.error(`  ${adapter} page error: ${e.message}`));
    let finish: (error?: string) => void = () => {};
    const done = new Promise<string | undefined>((res) => {
      finish = res;
    });
    page.on('crash', () => finish('the page crashed'));
    browser.on('disconnected', () => finish('the browser went away'));
    await page.exposeFunction('webtuneReport', (r: BenchRecord) => keepRecord(r, args, torch, records));
    await page.exposeFunction('webtuneDone', (error?: string) => finish(error));
    const params = new URLSearchParams({ suite: args.suites.join(','), adapterName: `chromium ${adapter}` });
    if (chromiumFeatureLevel(adapter) === 'compatibility') params.set('featureLevel', 'compatibility');
    if (args.quick) params.set('quick', '1');
    if (args.only) params.set('only', args.only);
    if (args.shape) params.set('shape', args.shape);
    if (args.samples !== undefined) params.set('samples', String(args.samples));
    if (args.kernels !== 'auto') params.set('kernels', args.kernels);
    if (args.staging !== 'auto') params.set('staging', args.staging);
    if (peer) {
      params.set('peerModels', peer.models);
      params.set('peerIds', peer.ids.join(','));
      params.set('ortWasm', peer.wasm);
      params.set('ortMjs', peer.mjs);
    }
    await page.goto(`${url}bench/index.html?${params}`);
    const limitMs = args.timeoutMs ?? defaultTimeoutMin(args) * 60_000;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<string>((res) => {
      timer = setTimeout(() => res(`timed out after ${limitMs / 60000} min`), limitMs);
    });
    const error = await Promise.race([done, timeout]);
    clearTimeout(timer);
    if (error) throw new Error(`benchmark on ${adapter} failed: ${error}`);
  } finally {
    await browser.close();
  }
}

/**
 * The suites under Node (bench/node.ts) on Mesa 25's lavapipe: a child process whose `[record]`
 * lines are kept like a page's records and whose other lines are shown.
 */
async function runNodeAdapter(
  root: string,
  adapter: NodeAdapter,
  args: Args,
  torch: TorchRun | undefined,
  peer: NodeBenchSpec['peer'],
  records: BenchRecord[],
): Promise<void> {
  const spec: NodeBenchSpec = {
    root,
    adapterName: `node ${adapter.slice('node-'.length)}`,
    suites: args.suites,
    quick: args.quick,
    only: args.only,
    shape: args.shape,
    samples: args.samples,
    kernelProfile: args.kernels,
    matmulStaging: args.staging,
    peer,
  };
  const dir = mkdtempSync(join(tmpdir(), 'webtune-bench-'));
  try {
    writeFileSync(join(dir, 'spec.json'), JSON.stringify(spec));
    // Dawn warns without a runtime directory (this machine's root has none).
    const env = { ...lavapipe25Env(adapter), XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR || tmpdir() };
    const limitMs = args.timeoutMs ?? defaultTimeoutMin(args) * 60_000;
    let done = false;
    const bad: string[] = [];
    const end = await runLines(process.execPath, ['--import', 'tsx', 'bench/node.ts', join(dir, 'spec.json')], {
      cwd: root,
      env,
      timeoutMs: limitMs,
      onStdout: (line) => {
        if (line.startsWith('[record] ')) {
          // A line that is not a whole record (another writer on fd 1 mid-line) fails the run at
          // its end, after the other records are kept.
          try {
            const r = JSON.parse(line.slice(9)) as BenchRecord;
            if (typeof r.name !== 'string' || typeof r.ms !== 'number') throw new Error('not a bench record');
            keepRecord(r, args, torch, records);
          } catch (e) {
            bad.push(`${e instanceof Error ? e.message : String(e)}: ${line.slice(0, 200)}`);
          }
        } else if (line === '[done]') done = true;
        else if (line.startsWith('[bench] ')) console.log(`  ${adapter}: ${line.slice(8)}`);
        else if (line.trim()) console.log(`  ${adapter}: ${line}`);
      },
      // Shown as they come, as the page's console warnings and errors are.
      onStderr: (line) => {
        if (line.trim()) console.error(`  ${adapter} stderr: ${line}`);
      },
    });
    const how = end.timedOut
      ? `timed out after ${limitMs / 60000} min`
      : end.signal
        ? `killed by ${end.signal}`
        : end.code !== 0
          ? `exit ${end.code} (its stderr is above)`
          : !done
            ? 'it exited without finishing'
            : undefined;
    if (bad.length > 0) throw new Error(`benchmark on ${adapter}: unreadable record lines:\n${bad.join('\n')}`);
    if (how) throw new Error(`benchmark on ${adapter} failed: ${how}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The repository over Vite for the bench page. */
async function serveRepository(root: string, peer: boolean): Promise<{ server: ViteDevServer; url: string }> {
  const server = await createServer({
    configFile: false,
    root,
    logLevel: 'warn',
    // No file watching and no HMR: a file saved elsewhere in the tree mid-run must not reload
    // the page and restart the benchmarks.
    server: { host: '127.0.0.1', port: 0, strictPort: false, hmr: false, watch: null },
    // Pre-bundled up front: a dependency Vite discovers mid-run makes it reload the page.
    optimizeDeps: {
      include: [
        '@tensorflow/tfjs-core',
        '@tensorflow/tfjs-backend-webgpu',
        ...(peer ? ['@huggingface/transformers'] : []),
      ],
    },
  });
  await server.listen();
  const address = server.httpServer?.address();
  if (!address || typeof address === 'string') throw new Error('vite did not start');
  return { server, url: `http://127.0.0.1:${address.port}/` };
}

async function main(): Promise<number> {
  const args = parseArgs(process.argv.slice(2));
  const root = resolve(import.meta.dirname, '..');
  const needsModels = args.suites.includes('models') || args.suites.includes('train');
  let torch: TorchRun | undefined;
  if (needsModels) {
    // @webtune/models pulls in the WGSL shaders through Vite's `?raw` imports.
    register('../tools/raw-import-hooks.mjs', import.meta.url);
    const { ensureBenchModel } = await import('./bench_model.js');
    const m = ensureBenchModel(root);
    console.log(
      `${m.created ? 'wrote' : 'reusing'} the random SmolLM2-135M-shaped model in ${m.dir} (${(m.bytes / 1e6).toFixed(0)} MB` +
        `${m.created ? `, ${m.seconds.toFixed(1)} s` : ''})`,
    );
    // Measured before the browser runs, so the two never compete for the CPU.
    torch = await runTorchBaseline(root, args);
  }
  let peer: PeerLocation | undefined;
  // The same exports for a Node run: its folder on disk instead of the page's URLs.
  let nodePeer: NodeBenchSpec['peer'];
  if (args.suites.includes('models') && args.peer) {
    const byModel = casesByModel(inferenceCases(args.quick).filter((c) => !args.only || c.key.includes(args.only)));
    const { ensurePeerExports, PEER_DIR } = await import('./peer_export.js');
    const got = await ensurePeerExports(
      root,
      findPython(root),
      byModel.map(([id]) => id),
    );
    if ('location' in got) {
      peer = got.location;
      nodePeer = { dir: join(root, PEER_DIR), ids: peer.ids };
      for (const [id, why] of got.failed) console.log(`note: ${id} runs without the transformers.js peer: ${why}`);
    } else console.log(`note: no transformers.js peer: ${got.unavailable}`);
  }
  const all: BenchRecord[] = [];
  const failures: string[] = [];
  const run = async (adapter: BenchAdapter, go: () => Promise<void>) => {
    console.log(
      `benchmarks (${args.suites.join(', ')}) on ${isNodeAdapter(adapter) ? adapter : `chromium ${adapter}`}${args.quick ? ' (quick)' : ''}`,
    );
    try {
      await go();
    } catch (e) {
      failures.push(e instanceof Error ? e.message : String(e));
      console.error(failures.at(-1));
    }
  };
  // The page adapters share one Vite server, started for the first of them.
  let server: ViteDevServer | undefined;
  let url = '';
  try {
    for (const adapter of args.adapters) {
      if (isNodeAdapter(adapter)) {
        await run(adapter, () => runNodeAdapter(root, adapter, args, torch, nodePeer, all));
        continue;
      }
      if (!server) ({ server, url } = await serveRepository(root, peer !== undefined));
      await run(adapter, () => runAdapter(url, adapter, args, torch, peer, all));
    }
  } finally {
    await server?.close();
  }
  if (all.length === 0 && failures.length === 0) console.log('\nnote: no case ran (do --only and --shape match any?)');
  console.log(`\n${table(all)}`);
  const counts = countsTable(all);
  if (counts) console.log(`\nGPU work per training step / decoded token (exact runtime counts)\n${counts}`);
  const peers = peerTable(all);
  if (peers)
    console.log(
      '\ngeneration beside transformers.js (same page and adapter; under node-*, same process and Vulkan driver; same weights; ratio = webtune / transformers.js;' +
        ' transformers.js prefill applies the LM head to every prompt position, webtune to the last)\n' +
        peers,
    );
  const memory = memoryTable(all);
  if (memory)
    console.log(`\ntraining memory (webtune: every GPU buffer the trainer holds; torch: its CPU allocator)\n${memory}`);
  if (args.json) {
    writeFileSync(args.json, `${JSON.stringify(all, null, 2)}\n`);
    console.log(`\nwrote ${all.length} records to ${args.json}`);
  }
  if (failures.length > 0) {
    console.error(`\n${failures.length} adapter run(s) failed:\n${failures.join('\n')}`);
    return 1;
  }
  return 0;
}

// Exit explicitly: handles left open by Vite or Playwright must not keep the process alive.
main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exit(1);
  },
);
