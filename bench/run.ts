/**
 * `pnpm bench [--json out.json] [--adapter swiftshader,lavapipe|gpu] [--quick] [--suite kernels]
 *  [--chromium-flag=--some-flag ...]`
 *
 * Serves bench/ with Vite, opens it in headless Chromium once per adapter configuration, collects
 * the records, prints a table and writes them as a JSON array. Benchmarks never pass or fail on
 * their figures; the command fails only when a benchmark cannot run.
 */
import { writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { chromium } from 'playwright';
import { createServer } from 'vite';
import { type ChromiumAdapter, chromiumPath, chromiumWebGpuArgs } from '../tools/chromium.js';
import type { BenchRecord } from './record.js';

interface Args {
  json?: string;
  adapters: ChromiumAdapter[];
  quick: boolean;
  suite: string;
  extraFlags: string[];
  timeoutMs: number;
  only?: string;
}

function parseArgs(argv: string[]): Args {
  const args: Args = {
    adapters: ['swiftshader', 'lavapipe'],
    quick: false,
    suite: 'kernels',
    extraFlags: [],
    timeoutMs: 45 * 60_000,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const value = () => {
      const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a.startsWith('--json')) args.json = value();
    else if (a.startsWith('--adapter')) args.adapters = value().split(',') as ChromiumAdapter[];
    else if (a === '--quick') args.quick = true;
    else if (a.startsWith('--suite')) args.suite = value();
    else if (a.startsWith('--only')) args.only = value();
    else if (a.startsWith('--chromium-flag')) args.extraFlags.push(value());
    else if (a.startsWith('--timeout-min')) args.timeoutMs = Number(value()) * 60_000;
    else if (a === '--') continue;
    else throw new Error(`unknown argument ${a}`);
  }
  for (const ad of args.adapters) {
    if (!['swiftshader', 'lavapipe', 'gpu'].includes(ad))
      throw new Error(`unknown adapter ${ad}: use swiftshader, lavapipe or gpu`);
  }
  return args;
}

function table(records: BenchRecord[]): string {
  const rows = [['name', 'shape', 'ms', 'GFLOP/s', 'baseline', 'baseline ms', 'ratio', 'adapter']];
  for (const r of records) {
    rows.push([
      r.name,
      r.shape,
      r.ms.toFixed(2),
      r.gflops === null ? '' : r.gflops.toFixed(2),
      r.baseline ?? '',
      r.baselineMs === null ? '' : r.baselineMs.toFixed(2),
      r.ratio === null ? '' : r.ratio.toFixed(2),
      r.adapter,
    ]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ')).join('\n');
}

async function runAdapter(url: string, adapter: ChromiumAdapter, args: Args): Promise<BenchRecord[]> {
  const browser = await chromium.launch({
    executablePath: chromiumPath(),
    args: [...chromiumWebGpuArgs(adapter), ...args.extraFlags],
    headless: true,
  });
  const records: BenchRecord[] = [];
  try {
    const page = await browser.newPage();
    page.on('console', (m) => {
      const text = m.text();
      if (text.startsWith('[bench]')) console.log(`  ${adapter}: ${text.slice(8)}`);
      else if (m.type() === 'error') console.error(`  ${adapter} console error: ${text}`);
    });
    page.on('pageerror', (e) => console.error(`  ${adapter} page error: ${e.message}`));
    let finish: (error?: string) => void = () => {};
    const done = new Promise<string | undefined>((res) => {
      finish = res;
    });
    page.on('crash', () => finish('the page crashed'));
    browser.on('disconnected', () => finish('the browser went away'));
    await page.exposeFunction('webtuneReport', (r: BenchRecord) => {
      records.push(r);
      console.log(
        `  ${r.name} ${r.shape}: ${r.ms.toFixed(2)} ms${r.ratio === null ? '' : `, ratio ${r.ratio.toFixed(2)} vs ${r.baseline}`}`,
      );
    });
    await page.exposeFunction('webtuneDone', (error?: string) => finish(error));
    const params = new URLSearchParams({ suite: args.suite, adapterName: `chromium ${adapter}` });
    if (adapter === 'lavapipe') params.set('featureLevel', 'compatibility');
    if (args.quick) params.set('quick', '1');
    if (args.only) params.set('only', args.only);
    await page.goto(`${url}bench/index.html?${params}`);
    const timeout = new Promise<string>((res) =>
      setTimeout(() => res(`timed out after ${args.timeoutMs / 60000} min`), args.timeoutMs),
    );
    const error = await Promise.race([done, timeout]);
    if (error) throw new Error(`benchmark on ${adapter} failed: ${error}`);
  } finally {
    await browser.close();
  }
  return records;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const root = resolve(import.meta.dirname, '..');
  const server = await createServer({
    configFile: false,
    root,
    logLevel: 'warn',
    server: { host: '127.0.0.1', port: 0, strictPort: false },
    optimizeDeps: { include: ['@tensorflow/tfjs-core', '@tensorflow/tfjs-backend-webgpu'] },
  });
  await server.listen();
  const address = server.httpServer?.address();
  if (!address || typeof address === 'string') throw new Error('vite did not start');
  const url = `http://127.0.0.1:${address.port}/`;
  const all: BenchRecord[] = [];
  try {
    for (const adapter of args.adapters) {
      console.log(`benchmarks on chromium ${adapter}${args.quick ? ' (quick)' : ''}`);
      all.push(...(await runAdapter(url, adapter, args)));
    }
  } finally {
    await server.close();
  }
  console.log(`\n${table(all)}`);
  if (args.json) {
    writeFileSync(args.json, `${JSON.stringify(all, null, 2)}\n`);
    console.log(`\nwrote ${all.length} records to ${args.json}`);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
