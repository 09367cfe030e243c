// The packages as a web developer gets them: `pnpm pack` the three libraries, install only
// @webtune/train's tarball (its siblings from their tarballs, everything else from the npm
// registry) into a fresh Vite app outside the workspace, build it for production with no plugin or
// configuration, serve the build and drive it in Debian's Chromium with WebGPU: train stories260K
// in the worker, reload mid-run and resume to the same loss, keep and export adapters, generate,
// and let two tabs contend for the GPU.
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Browser, type BrowserContext, chromium, type Page } from 'playwright';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chromiumPath, chromiumWebGpuArgs } from '../tools/chromium.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'webtune-fresh-app-'));
const app = join(work, 'app');
let preview: ReturnType<typeof spawn> | undefined;
let browser: Browser;
let context: BrowserContext;
let url = '';
const pageErrors: string[] = [];

function run(cmd: string, args: string[], cwd: string): string {
  const r = spawnSync(cmd, args, {
    cwd,
    encoding: 'utf8',
    env: { ...process.env, npm_config_update_notifier: 'false' },
  });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

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

/** Every package.json under node_modules whose scripts run at install time. */
function installScripts(dir: string): string[] {
  const found: string[] = [];
  const visit = (modules: string) => {
    if (!existsSync(modules)) return;
    for (const entry of readdirSync(modules)) {
      if (entry.startsWith('.')) continue;
      const path = join(modules, entry);
      if (entry.startsWith('@')) {
        visit(path);
        continue;
      }
      const manifest = join(path, 'package.json');
      if (existsSync(manifest)) {
        const scripts = JSON.parse(readFileSync(manifest, 'utf8')).scripts ?? {};
        for (const hook of ['preinstall', 'install', 'postinstall'])
          if (scripts[hook]) found.push(`${entry}: ${hook} ${scripts[hook]}`);
      }
      visit(join(path, 'node_modules'));
    }
  };
  visit(join(dir, 'node_modules'));
  return found;
}

async function newPage(): Promise<Page> {
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(url);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 60_000 });
  return page;
}

beforeAll(async () => {
  const packs = join(work, 'packs');
  run(process.execPath, [join(root, 'tools/build-packages.mjs'), '--pack', packs], root);
  cpSync(join(root, 'e2e/fresh-app'), app, { recursive: true });
  cpSync(join(root, 'apps/studio/public/models/stories260K'), join(app, 'public/models/stories260K'), {
    recursive: true,
  });
  const vite = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).devDependencies.vite as string;
  const template = readFileSync(join(app, 'package.template.json'), 'utf8');
  writeFileSync(join(app, 'package.json'), template.replaceAll('TARBALLS', packs).replace('VITE_VERSION', vite));
  rmSync(join(app, 'package.template.json'));
  // The library's own dependencies must install without running anything: production only first.
  run('npm', ['install', '--omit=dev', '--no-audit', '--no-fund'], app);
  expect(installScripts(app), 'install scripts in @webtune/train and its dependencies').toEqual([]);
  run('npm', ['install', '--no-audit', '--no-fund'], app);
  run(process.execPath, [join(app, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'warn'], app);
  const port = await freePort();
  preview = spawn(
    process.execPath,
    [
      join(app, 'node_modules/vite/bin/vite.js'),
      'preview',
      '--port',
      String(port),
      '--strictPort',
      '--host',
      '127.0.0.1',
    ],
    { cwd: app, stdio: 'ignore' },
  );
  url = `http://127.0.0.1:${port}/`;
  for (let i = 0; i < 100; i++) {
    if (
      await fetch(url).then(
        (r) => r.ok,
        () => false,
      )
    )
      break;
    await new Promise((r) => setTimeout(r, 100));
  }
  browser = await chromium.launch({
    executablePath: chromiumPath(),
    args: chromiumWebGpuArgs('swiftshader'),
    headless: true,
  });
  // One profile for every page: IndexedDB (the adapter library, checkpoints) is shared by tabs and survives reloads.
  context = await browser.newContext();
}, 600_000);

afterAll(async () => {
  await browser?.close();
  preview?.kill();
  rmSync(work, { recursive: true, force: true });
});

describe('a fresh Vite app with the packed @webtune/train', () => {
  let whole: { trainLoss: number; losses: number[] };

  it('ships ESM, types and the worker without TypeScript sources or a private flag', () => {
    const installed = join(app, 'node_modules/@webtune/train');
    const manifest = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8'));
    expect(manifest.private).toBeUndefined();
    expect(manifest.exports['.'].types).toBe('./dist/types/index.d.ts');
    expect(existsSync(join(installed, 'dist/worker.js'))).toBe(true);
    expect(existsSync(join(installed, 'src'))).toBe(false);
    expect(readFileSync(join(installed, 'dist/index.js'), 'utf8')).toContain('new URL("./worker.js", import.meta.url)');
    // The shaders are inlined as text in the core package.
    expect(readFileSync(join(app, 'node_modules/@webtune/core/dist/index.js'), 'utf8')).toContain('@compute');
  });

  it('trains stories260K in a worker, keeps the adapter and exports its PEFT files', async () => {
    const page = await newPage();
    expect(
      await page.evaluate(() => (window as never as { app: { inWorker(): Promise<boolean> } }).app.inWorker()),
    ).toBe(true);
    whole = await page.evaluate(() =>
      (window as never as { app: { train(n: string, s: number): Promise<never> } }).app.train('whole', 10),
    );
    expect(whole.losses).toHaveLength(10);
    expect(whole.losses.at(-1)).toBeLessThan(whole.losses[0] as number);
    const adapters = await page.evaluate(() =>
      (window as never as { app: { adapters(): Promise<{ name: string }[]> } }).app.adapters(),
    );
    expect(adapters.map((a) => a.name)).toContain('whole');
    const exported = await page.evaluate(() =>
      (
        window as never as {
          app: {
            exported(
              n: string,
            ): Promise<{ config: Record<string, unknown>; header: Record<string, { shape: number[] }> }>;
          };
        }
      ).app.exported('whole'),
    );
    expect(exported.config.peft_type).toBe('LORA');
    expect(exported.config.target_modules).toEqual(['q_proj', 'v_proj']);
    const keys = Object.keys(exported.header).filter((k) => k !== '__metadata__');
    expect(keys).toHaveLength(5 * 2 * 2); // 5 layers × q_proj, v_proj × A, B
    expect(exported.header['base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight']?.shape).toEqual([32, 4]);
    const texts = await page.evaluate(async () => {
      const a = (window as never as { app: { generate(p: string, a?: string): Promise<string> } }).app;
      return [await a.generate('Once upon a time'), await a.generate('Once upon a time', 'whole')];
    });
    expect(texts[0]?.length).toBeGreaterThan(0);
    expect(texts[1]).not.toBe(texts[0]);
    await page.close();
  }, 600_000);

  it('reports a full storage quota clearly and keeps what was saved before', async () => {
    const page = await newPage();
    const origin = new URL(url).origin;
    const cdp = await context.newCDPSession(page);
    // Load the model first, so that the only write left is the run's own, then leave no room at all.
    await page.evaluate(() => (window as never as { app: { inWorker(): Promise<boolean> } }).app.inWorker());
    await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: 1 });
    // Chromium's IndexedDB keeps granting from the space it last learnt was free for up to 30 s
    // (BucketContext::kBucketSpaceCacheTimeLimit) before it asks the quota manager again, and the
    // previous test has just written: wait that allowance out, or the checkpoint still fits.
    await new Promise((resolve) => setTimeout(resolve, 31_000));
    try {
      const result = await page.evaluate(() =>
        (window as never as { app: { train(n: string, s: number): Promise<unknown> } }).app.train('too-big', 4).then(
          () => 'trained',
          (e: Error) => `${e.name}: ${e.message}`,
        ),
      );
      expect(result).toMatch(/^StorageQuotaError: not enough storage to save the checkpoint of run "too-big"/);
    } finally {
      await cdp.send('Storage.overrideQuotaForOrigin', { origin });
    }
    const adapters = await page.evaluate(() =>
      (window as never as { app: { adapters(): Promise<{ name: string }[]> } }).app.adapters(),
    );
    expect(adapters.map((a) => a.name)).toEqual(['whole']);
    const exported = await page.evaluate(() =>
      (window as never as { app: { exported(n: string): Promise<{ config: { r: number } }> } }).app.exported('whole'),
    );
    expect(exported.config.r).toBe(4);
    await page.close();
  }, 600_000);

  it('survives a reload mid-run and resumes to the same final loss', async () => {
    const page = await newPage();
    await page.evaluate(() =>
      (window as never as { app: { start(n: string, s: number): Promise<string> } }).app.start('cut', 10),
    );
    await page.waitForFunction(
      () =>
        (window as never as { app: { events(): { type: string; step: number }[] } }).app
          .events()
          .some((e) => e.type === 'checkpoint' && e.step >= 4),
      undefined,
      { timeout: 300_000, polling: 100 },
    );
    await page.reload(); // the worker dies mid-run, as when a tab is closed
    await page.waitForSelector('body[data-ready="true"]');
    const saved = await page.evaluate(() =>
      (window as never as { app: { checkpoints(): Promise<{ name: string; step: number }[]> } }).app.checkpoints(),
    );
    const cut = saved.find((c) => c.name === 'cut');
    expect(cut?.step).toBeGreaterThanOrEqual(4);
    expect(cut?.step).toBeLessThan(10);
    const resumed = await page.evaluate(() =>
      (
        window as never as {
          app: { resume(n: string): Promise<{ trainLoss: number; losses: number[]; steps: number }> };
        }
      ).app.resume('cut'),
    );
    expect(resumed.steps).toBe(10);
    expect(resumed.losses).toHaveLength(10 - (cut?.step ?? 0));
    expect(Math.abs(resumed.trainLoss - whole.trainLoss) / whole.trainLoss).toBeLessThanOrEqual(1e-5);
    await page.close();
  }, 600_000);

  it('lets one tab at a time train: the second gets a clear error, or waits its turn', async () => {
    const first = await newPage();
    const second = await newPage();
    await first.evaluate(() =>
      (window as never as { app: { start(n: string, s: number): Promise<string> } }).app.start('first', 6),
    );
    await first.waitForFunction(
      () => (window as never as { app: { events(): { type: string }[] } }).app.events().some((e) => e.type === 'step'),
      undefined,
      { timeout: 300_000 },
    );
    const refused = await second.evaluate(() =>
      (window as never as { app: { train(n: string, s: number): Promise<unknown> } }).app.train('second', 2).then(
        () => 'trained',
        (e: Error) => `${e.name}: ${e.message}`,
      ),
    );
    expect(refused).toMatch(/^TrainerBusyError: another training run is using the GPU/);
    const waited = await second.evaluate(async () => {
      const app = (window as never as { app: { train(n: string, s: number, w: string): Promise<{ status: string }> } })
        .app;
      const r = await app.train('second', 2, 'wait');
      return { status: r.status, at: Date.now() };
    });
    const firstDone = await first.evaluate(
      () => (window as never as { finished?: { status: string } }).finished?.status,
    );
    expect(firstDone).toBe('completed');
    expect(waited.status).toBe('completed');
    await first.close();
    await second.close();
    expect(pageErrors).toEqual([]);
  }, 600_000);
});
