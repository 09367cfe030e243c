// The studio as a person uses it: the production build (vite build + vite preview) in Debian's
// Chromium with WebGPU on SwiftShader. The whole flow on the bundled model and example data
// (train 20 steps, the loss falls, generate beside the base model, download the PEFT files);
// reload mid-run and resume; reload with the network cut and train again; a malformed file and
// a line of HTML shown as text; a .gguf file loaded with 4-bit weights and trained on; no
// main-thread task over 100 ms while training; no serious or critical axe-core violation in any
// place; a screenshot of each place in e2e/screenshots/.
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import AxeBuilder from '@axe-core/playwright';
import { type Browser, type BrowserContext, chromium, type Page } from 'playwright';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chromiumPath, chromiumWebGpuArgs } from '../tools/chromium.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const shots = join(root, 'e2e/screenshots');
const scratch = mkdtempSync(join(tmpdir(), 'webtune-studio-'));
let preview: ReturnType<typeof spawn> | undefined;
let browser: Browser;
let context: BrowserContext;
let page: Page;
let url = '';
const pageErrors: string[] = [];
const dialogs: string[] = [];

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

async function open(p: Page): Promise<void> {
  await p.goto(url);
  await p.waitForSelector('body[data-ready="true"]', { timeout: 180_000 });
}

/** Starts recording main-thread tasks over 50 ms (the Long Tasks API) from now on. */
async function recordLongTasks(p: Page): Promise<void> {
  await p.evaluate(() => {
    const w = window as unknown as { longTasks: number[] };
    w.longTasks = [];
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) w.longTasks.push(entry.duration);
    }).observe({ type: 'longtask' });
  });
}

async function axe(p: Page, place: string): Promise<void> {
  const result = await new AxeBuilder({ page: p }).include('main').include('nav').include('header').analyze();
  const bad = result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  expect(
    bad.map((v) => `${place}: ${v.id} (${v.impact}) ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`),
  ).toEqual([]);
}

async function go(p: Page, place: string): Promise<void> {
  await p.click(`#nav-${place}`);
  await p.waitForSelector(`#place-${place}:not([hidden])`);
}

async function shoot(p: Page, place: string): Promise<void> {
  await p.screenshot({ path: join(shots, `${place}.png`), fullPage: true });
}

/** Sets the run to `steps` steps of batch 2 and starts it. */
async function startRun(p: Page, steps: number, checkpointEvery = 5): Promise<void> {
  await go(p, 'configure');
  await p.fill('#cfg-steps', String(steps));
  await p.fill('#cfg-batch', '2');
  await p.fill('#cfg-checkpoint', String(checkpointEvery));
  await p.click('#start-training');
  await p.waitForSelector('#place-train:not([hidden])');
}

async function waitStatus(p: Page, status: string, timeout = 400_000): Promise<void> {
  await p.waitForFunction((s) => document.querySelector<HTMLElement>('#place-train')?.dataset.status === s, status, {
    timeout,
    polling: 250,
  });
}

beforeAll(async () => {
  mkdirSync(shots, { recursive: true });
  const vite = join(root, 'node_modules/vite/bin/vite.js');
  const built = spawnSync(process.execPath, [vite, 'build', '--logLevel', 'warn'], { cwd: root, encoding: 'utf8' });
  if (built.status !== 0) throw new Error(`vite build failed:\n${built.stdout}\n${built.stderr}`);
  const port = await freePort();
  preview = spawn(process.execPath, [vite, 'preview', '--port', String(port), '--strictPort', '--host', '127.0.0.1'], {
    cwd: root,
    stdio: 'ignore',
  });
  url = `http://127.0.0.1:${port}/`;
  for (let i = 0; i < 150; i++) {
    if (
      await fetch(url).then(
        (r) => r.ok,
        () => false,
      )
    )
      break;
    await new Promise((r) => setTimeout(r, 200));
  }
  browser = await chromium.launch({
    executablePath: chromiumPath(),
    args: chromiumWebGpuArgs('swiftshader'),
    headless: true,
  });
  context = await browser.newContext({ viewport: { width: 1200, height: 900 }, acceptDownloads: true });
  page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('dialog', (d) => {
    dialogs.push(d.message());
    void d.dismiss();
  });
  await open(page);
}, 300_000);

afterAll(async () => {
  await browser?.close();
  preview?.kill();
  rmSync(scratch, { recursive: true, force: true });
});

describe('webtune studio (production build)', () => {
  it('opens on the bundled model, ready to go', async () => {
    expect(await page.textContent('#model-loaded')).toMatch(/stories260K.* is ready on/);
    await shoot(page, 'model');
    await axe(page, 'model');
  }, 120_000);

  it('trains 20 steps on the example data, the loss falls, without freezing the page', async () => {
    await go(page, 'data');
    await page.click('#use-example');
    await page.waitForSelector('#data-summary', { timeout: 120_000 });
    expect(await page.textContent('#data-stats')).toMatch(/example-stories\.jsonl/);
    expect(await page.locator('#data-preview .tok.trained').count()).toBeGreaterThan(10);
    await shoot(page, 'data');
    await axe(page, 'data');
    await go(page, 'configure');
    await page.waitForSelector('#cfg-total', { timeout: 120_000 });
    await shoot(page, 'configure');
    await axe(page, 'configure');
    await recordLongTasks(page);
    await startRun(page, 20, 0);
    await waitStatus(page, 'completed');
    const longTasks = await page.evaluate(() => (window as unknown as { longTasks: number[] }).longTasks);
    expect(
      longTasks.filter((d) => d > 100),
      'main-thread tasks over 100 ms while training',
    ).toEqual([]);
    expect(await page.getAttribute('#loss-chart', 'data-points')).toBe('20');
    const label = (await page.getAttribute('#loss-chart', 'aria-label')) ?? '';
    const [, first, last] = /from ([\d.]+) to ([\d.]+)/.exec(label) ?? [];
    expect(Number(last)).toBeLessThan(Number(first));
    await shoot(page, 'train');
    await axe(page, 'train');
  }, 600_000);

  it('generates beside the base model, keeps the adapter across a reload, and downloads its PEFT files', async () => {
    await page.click('#go-try');
    await page.fill('#try-prompt', 'Once upon a time');
    await page.click('#generate');
    await page.waitForSelector('#out-adapter[data-done="true"]', { timeout: 180_000 });
    await page.waitForSelector('#out-base[data-done="true"]', { timeout: 180_000 });
    const base = await page.textContent('#out-base');
    const tuned = await page.textContent('#out-adapter');
    expect(base?.length).toBeGreaterThan(0);
    expect(tuned).not.toBe(base);
    await shoot(page, 'try');
    await axe(page, 'try');
    const name = await page.getAttribute('#library tbody tr', 'data-adapter');
    expect(name).toMatch(/^adapter-/);
    await open(page);
    await go(page, 'try');
    await page.waitForSelector(`#library tr[data-adapter="${name}"]`);
    const downloads: Record<string, Buffer> = {};
    const done = new Promise<void>((resolve) => {
      page.on('download', async (d) => {
        const path = join(scratch, d.suggestedFilename());
        await d.saveAs(path);
        downloads[d.suggestedFilename()] = readFileSync(path);
        if (Object.keys(downloads).length === 2) resolve();
      });
    });
    await page.click(`#library tr[data-adapter="${name}"] button[aria-label="Download ${name}"]`);
    await done;
    const config = JSON.parse((downloads['adapter_config.json'] as Buffer).toString('utf8'));
    expect(config.peft_type).toBe('LORA');
    expect(config.target_modules).toEqual(['q_proj', 'v_proj']);
    const weights = downloads['adapter_model.safetensors'] as Buffer;
    const n = Number(weights.readBigUInt64LE(0));
    const header = JSON.parse(weights.subarray(8, 8 + n).toString('utf8'));
    expect(header['base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight'].shape).toEqual([8, 64]);
    expect(header['base_model.model.model.layers.4.self_attn.v_proj.lora_B.weight'].shape).toEqual([32, 8]);
  }, 600_000);

  it('offers an interrupted run after a reload and resumes it to the end', async () => {
    await go(page, 'data');
    await page.click('#use-example');
    await page.waitForSelector('#data-summary', { timeout: 120_000 });
    await startRun(page, 12, 3);
    await page.waitForFunction(
      () => /step ([6-9]|1[01]) of 12/.test(document.querySelector('#train-status')?.textContent ?? ''),
      undefined,
      {
        timeout: 400_000,
        polling: 200,
      },
    );
    await open(page); // the worker dies mid-run
    await page.waitForSelector('#resumable button.primary', { timeout: 60_000 });
    const offer = (await page.textContent('#resumable')) ?? '';
    const [, step] = /interrupted at step (\d+) of 12/.exec(offer) ?? [];
    expect(Number(step)).toBeGreaterThanOrEqual(3);
    await page.click('#resumable button.primary');
    await waitStatus(page, 'completed');
    expect(await page.textContent('#train-status')).toMatch(/step 12 of 12/);
    expect(await page.locator('#resumable .offer').count()).toBe(0);
  }, 600_000);

  it('works with the network cut: reloads from the service worker and trains the bundled model', async () => {
    await page.evaluate(() => navigator.serviceWorker.ready);
    await context.setOffline(true);
    try {
      await open(page);
      expect(await page.textContent('#model-loaded')).toMatch(/stories260K/);
      await go(page, 'data');
      await page.click('#use-example');
      await page.waitForSelector('#data-summary', { timeout: 120_000 });
      await startRun(page, 3, 0);
      await waitStatus(page, 'completed');
    } finally {
      await context.setOffline(false);
    }
  }, 600_000);

  it('names the line of a malformed file, and shows a line of HTML as text', async () => {
    await go(page, 'data');
    const bad = join(scratch, 'notes.jsonl');
    writeFileSync(bad, '{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n');
    await page.setInputFiles('#data-file', bad);
    await page.waitForSelector('#error strong');
    expect(await page.textContent('#error')).toMatch(/notes\.jsonl, line 3: not valid JSON/);
    // Both records for training (none held out), so the preview shows the HTML one.
    await page.click('#place-data summary');
    await page.fill('#data-validation', '0');
    const html = join(scratch, 'html.jsonl');
    writeFileSync(
      html,
      `${JSON.stringify({ text: 'Look: <img src=x onerror=alert(1)> here.' })}\n{"text": "Once upon a time."}\n`,
    );
    await page.setInputFiles('#data-file', html);
    await page.waitForFunction(() => document.querySelector('#data-summary')?.textContent?.includes('html.jsonl'));
    expect(await page.locator('#data-preview img').count()).toBe(0);
    expect(await page.textContent('#data-preview')).toContain('<img src=x onerror=alert(1)>');
    expect(dialogs).toEqual([]);
    expect(pageErrors).toEqual([]);
  }, 300_000);

  it('loads a .gguf file from this computer with 4-bit weights and trains on it', async () => {
    await go(page, 'model');
    await page.selectOption('#model-precision', 'q4_0');
    await page.setInputFiles('#model-gguf', join(root, 'packages/models/test/fixtures/gguf/gpt2/tiny-gpt2-q.gguf'));
    await page.waitForFunction(
      () => /tiny-gpt2-q/.test(document.querySelector('#model-loaded')?.textContent ?? ''),
      undefined,
      { timeout: 120_000, polling: 250 },
    );
    expect(await page.textContent('#model-status')).toMatch(/GPT2LMHeadModel.*\(q4_0\)/s);
    await go(page, 'data');
    await page.click('#use-example');
    await page.waitForSelector('#data-summary', { timeout: 120_000 });
    await startRun(page, 3, 0);
    await waitStatus(page, 'completed');
    expect(await page.textContent('#train-status')).toMatch(/step 3 of 3/);
    expect(pageErrors).toEqual([]);
  }, 600_000);
});
