// The start page in real Chromium with WebGPU on the CPU (SwiftShader): the embedded model
// generates its known story, an adapter trains in the tab and generation uses it, and the kernel
// checks pass on the browser's GPU.
import { fileURLToPath } from 'node:url';
import { type Browser, chromium, type Page } from 'playwright';
import { createServer, type ViteDevServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chromiumPath, chromiumWebGpuArgs } from '../tools/chromium.js';

const root = fileURLToPath(new URL('..', import.meta.url));
let server: ViteDevServer;
let browser: Browser;
let page: Page;
const errors: string[] = [];

beforeAll(async () => {
  server = await createServer({
    configFile: `${root}vite.config.ts`,
    root: `${root}apps/studio`,
    logLevel: 'warn',
    server: { host: '127.0.0.1', port: 0 },
  });
  await server.listen();
  const address = server.httpServer?.address();
  if (!address || typeof address === 'string') throw new Error('vite did not start');
  browser = await chromium.launch({
    executablePath: chromiumPath(),
    args: chromiumWebGpuArgs('swiftshader'),
    headless: true,
  });
  page = await browser.newPage();
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`http://127.0.0.1:${address.port}/`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 120_000 });
}, 180_000);

afterAll(async () => {
  await browser?.close();
  await server?.close();
});

describe('start page', () => {
  it('shows the GPU and generates the embedded model’s story', async () => {
    expect(await page.textContent('#gpu')).toMatch(/GPU: .*swiftshader/i);
    await page.fill('#prompt', '');
    await page.fill('#max-tokens', '20');
    await page.click('#generate');
    await page.waitForSelector('#output[data-done="true"]', { timeout: 120_000 });
    expect(await page.textContent('#output')).toBe(
      'Once upon a time, there was a little girl named Lily. She loved to play',
    );
  }, 180_000);

  it('trains an adapter in the tab and generates with it', async () => {
    await page.fill('#train-steps', '4');
    await page.click('#train');
    await page.waitForSelector('#train-log[data-done="true"]', { timeout: 240_000 });
    const log = (await page.textContent('#train-log')) ?? '';
    const losses = [...log.matchAll(/loss (\d+\.\d+)/g)].map((m) => Number(m[1]));
    expect(losses.length).toBe(4);
    expect(losses.every(Number.isFinite)).toBe(true);
    expect(losses.at(-1)).toBeLessThan(losses[0] as number);
    expect(log).toMatch(/with the adapter: /);
  }, 300_000);

  it('passes the kernel checks on the browser’s GPU', async () => {
    await page.click('#checks');
    await page.waitForSelector('#checks-table[data-result]', { timeout: 240_000 });
    expect(await page.getAttribute('#checks-table', 'data-result')).toBe('pass');
    expect(errors).toEqual([]);
  }, 300_000);
});
