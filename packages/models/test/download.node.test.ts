// Downloading models with byte progress into the cache, and reading them back offline: against a
// local HTTP server that serves the real model folders (stories260K, tiny-qwen3) with the Hub's
// URL layout (the file-listing API and resolve URLs); nothing else stands in for the Hub.
import { cpSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  cachedUrlSource,
  type DownloadProgress,
  deleteCachedModel,
  directorySource,
  HubRepoError,
  hubModelSource,
  listCachedModels,
  loadModelConfig,
  loadTokenizer,
  ModelFileError,
  modelFingerprint,
  openModelWeights,
} from '../src/index.js';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'webtune-download-'));
const repos: Record<string, string> = {
  'test/stories': join(root, 'apps/studio/public/models/stories260K'),
  'test/qwen3': join(root, 'packages/models/test/fixtures/tiny-qwen3'),
  'test/bert': join(work, 'bert'),
};
let server: Server;
let endpoint = '';
const log: string[] = [];
/** Bytes per second for weight files (0 = as fast as possible), to abort a download midway. */
let throttle = 0;

function serve(req: IncomingMessage, res: ServerResponse): void {
  const url = new URL(req.url ?? '/', 'http://x');
  log.push(url.pathname);
  const gz = /^\/gzip\/(.+)$/.exec(url.pathname);
  if (gz) {
    // A host that compresses every answer and states the compressed length (as vite preview and
    // many static hosts do).
    let body: Buffer;
    try {
      body = gzipSync(readFileSync(join(repos['test/stories'] as string, decodeURIComponent(gz[1] as string))));
    } catch {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'Content-Encoding': 'gzip', 'Content-Length': body.length }).end(body);
    return;
  }
  const tree = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/?]+)$/.exec(url.pathname);
  const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
  const repo = tree?.[1] ?? resolve?.[1];
  if (repo === 'test/gated') {
    res
      .writeHead(401, { 'Content-Type': 'application/json' })
      .end('{"error":"Access to model test/gated is restricted."}');
    return;
  }
  const dir = repo ? repos[repo] : undefined;
  if (!dir) {
    res.writeHead(404, { 'Content-Type': 'application/json' }).end('{"error":"Repository not found"}');
    return;
  }
  if (tree) {
    const files = readdirSync(dir).map((name) => ({ type: 'file', path: name, size: statSync(join(dir, name)).size }));
    res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify(files));
    return;
  }
  const name = decodeURIComponent(resolve?.[3] ?? '');
  let body: Buffer;
  try {
    body = readFileSync(join(dir, name));
  } catch {
    res.writeHead(404).end('Entry not found');
    return;
  }
  res.writeHead(200, { 'Content-Length': body.length, 'Content-Type': 'application/octet-stream' });
  if (!throttle || !name.endsWith('.safetensors')) {
    res.end(body);
    return;
  }
  let at = 0;
  const timer = setInterval(() => {
    const chunk = body.subarray(at, at + throttle / 10);
    at += chunk.length;
    res.write(chunk);
    if (at >= body.length) {
      clearInterval(timer);
      res.end();
    }
  }, 100);
  res.on('close', () => clearInterval(timer));
}

beforeAll(async () => {
  cpSync(repos['test/stories'] as string, repos['test/bert'] as string, { recursive: true });
  const config = JSON.parse(readFileSync(join(repos['test/bert'] as string, 'config.json'), 'utf8'));
  writeFileSync(
    join(repos['test/bert'] as string, 'config.json'),
    JSON.stringify({ ...config, architectures: ['BertModel'] }),
  );
  server = createServer(serve);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
});

describe('hubModelSource', () => {
  it('downloads with byte progress, then loads from the cache with the server gone', async () => {
    const cacheDir = join(work, 'cache-a');
    const progress: DownloadProgress[] = [];
    const first = await hubModelSource('test/stories', { endpoint, cacheDir, onProgress: (p) => progress.push(p) });
    expect(first.fromCache).toBe(false);
    expect(first.id).toBe('test/stories');
    const weights = progress.filter((p) => p.file === 'model.safetensors');
    expect(weights.at(-1)).toEqual({ file: 'model.safetensors', loaded: 1_044_992, total: 1_044_992 });
    expect(statSync(join(repos['test/stories'] as string, 'model.safetensors')).size).toBe(1_044_992);
    expect(new Set(progress.map((p) => p.file))).toEqual(
      new Set([
        'config.json',
        'generation_config.json',
        'tokenizer.json',
        'tokenizer_config.json',
        'model.safetensors',
      ]),
    );
    // Offline: every request would fail now.
    const offline = async (input: string) => {
      throw new TypeError(`network is down: ${input}`);
    };
    const again = await hubModelSource('test/stories', { endpoint, cacheDir, fetch: offline });
    expect(again.fromCache).toBe(true);
    expect((await loadModelConfig(again.source)).architecture).toBe('LlamaForCausalLM');
    expect((await loadTokenizer(again.source)).encode('Once upon a time').length).toBeGreaterThan(2);
    const direct = directorySource(repos['test/stories'] as string);
    const a = await openModelWeights(again.source);
    const b = await openModelWeights(direct);
    const name = a.names()[3] as string;
    expect(await a.readTensor(name)).toEqual(await b.readTensor(name));
    expect(await listCachedModels({ cacheDir })).toMatchObject([{ id: 'test/stories', bytes: expect.any(Number) }]);
    expect(await deleteCachedModel('test/stories', { cacheDir })).toBe(true);
    expect(await listCachedModels({ cacheDir })).toEqual([]);
    await expect(hubModelSource('test/stories', { endpoint, cacheDir, fetch: offline })).rejects.toThrow(
      /could not be reached .*are you offline/,
    );
  });

  it('names a missing, gated or unsupported repository before downloading weights', async () => {
    const cacheDir = join(work, 'cache-b');
    const missing = await hubModelSource('test/nope', { endpoint, cacheDir }).catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(HubRepoError);
    expect((missing as Error).message).toMatch(/test\/nope: does not exist/);
    await expect(hubModelSource('test/gated', { endpoint, cacheDir })).rejects.toThrow(/is gated or private/);
    await expect(hubModelSource('not a repo', { endpoint, cacheDir })).rejects.toThrow(/not a repository id/);
    log.length = 0;
    const bert = await hubModelSource('test/bert', { endpoint, cacheDir }).catch((e: unknown) => e);
    expect(bert).toBeInstanceOf(ModelFileError);
    expect((bert as Error).message).toMatch(
      /architecture "BertModel" is not supported; webtune trains LlamaForCausalLM/,
    );
    expect(log.some((p) => p.endsWith('.safetensors'))).toBe(false);
  });

  it('leaves an aborted download incomplete, so the next load downloads again', async () => {
    const cacheDir = join(work, 'cache-c');
    const controller = new AbortController();
    throttle = 200_000;
    try {
      const aborted = hubModelSource('test/stories', {
        endpoint,
        cacheDir,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.file === 'model.safetensors' && p.loaded > 0) controller.abort();
        },
      });
      await expect(aborted).rejects.toThrow();
    } finally {
      throttle = 0;
    }
    expect(await listCachedModels({ cacheDir })).toEqual([]);
    // What was stored before the abort is gone too.
    expect(readdirSync(cacheDir)).toEqual([]);
    const again = await hubModelSource('test/stories', { endpoint, cacheDir });
    expect(again.fromCache).toBe(false);
    expect((await listCachedModels({ cacheDir })).map((m) => m.id)).toEqual(['test/stories']);
  });

  it('caches a model folder under any URL the same way', async () => {
    const cacheDir = join(work, 'cache-d');
    const url = `${endpoint}/test/qwen3/resolve/main/`;
    const first = await cachedUrlSource(url, { cacheDir });
    expect(first.fromCache).toBe(false);
    const again = await cachedUrlSource(url, { cacheDir, fetch: async () => Promise.reject(new TypeError('offline')) });
    expect(again.fromCache).toBe(true);
    expect((await loadModelConfig(again.source)).architecture).toBe('Qwen3ForCausalLM');
  });
});

describe('cachedUrlSource over a compressing host', () => {
  it('stores the files’ real sizes, not the compressed lengths', async () => {
    const opened = await cachedUrlSource(`${endpoint}/gzip/`, { cacheDir: join(work, 'cache-gz') });
    const weights = await openModelWeights(opened.source);
    const direct = await openModelWeights(directorySource(repos['test/stories'] as string));
    const name = weights.names()[1] as string;
    expect(await weights.readTensor(name)).toEqual(await direct.readTensor(name));
    expect(await opened.source.size('model.safetensors')).toBe(1_044_992);
  });
});

describe('modelFingerprint', () => {
  it('is the same for the same files from any source, and changes with one weight byte', async () => {
    const dir = repos['test/stories'] as string;
    const cached = await cachedUrlSource(`${endpoint}/test/stories/resolve/main/`, { cacheDir: join(work, 'cache-e') });
    const a = await modelFingerprint(directorySource(dir));
    expect(await modelFingerprint(cached.source)).toBe(a);
    // A copy with one byte changed in the middle of one tensor (where the sample is taken).
    const copy = join(work, 'changed');
    cpSync(dir, copy, { recursive: true });
    const weights = await openModelWeights(directorySource(copy));
    const info = [...(await weights.infos()).values()][5];
    if (!info) throw new Error('no tensor');
    const bytes = readFileSync(join(copy, 'model.safetensors'));
    const middle = info.begin + Math.floor((info.end - info.begin) / 2);
    bytes[middle] = (bytes[middle] as number) ^ 1;
    writeFileSync(join(copy, 'model.safetensors'), bytes);
    expect(await modelFingerprint(directorySource(copy))).not.toBe(a);
    expect(await modelFingerprint(directorySource(repos['test/qwen3'] as string))).not.toBe(a);
  });
});
