// Model sources: a folder (node:fs file handles), a base URL (HTTP Range requests against a small
// local server), and dropped files (Blob.slice).
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ModelFileError } from '../src/errors.js';
import { openSafetensors, serializeSafetensors } from '../src/safetensors.js';
import { directorySource, filesSource, type ModelSource, urlSource } from '../src/source.js';

const BYTES = Uint8Array.from({ length: 1000 }, (_, i) => (i * 37) & 0xff);
const TENSORS = serializeSafetensors([{ name: 'w', dtype: 'F32', shape: [2, 3], data: [1, 2, 3, 4, 5, 6] }], {
  format: 'pt',
});

async function expectFileError(promise: Promise<unknown>, source: string, file: string, reason: RegExp): Promise<void> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error, 'expected a ModelFileError').toBeInstanceOf(ModelFileError);
  const e = error as ModelFileError;
  expect(e.source).toBe(source);
  expect(e.file).toBe(file);
  expect(e.reason).toMatch(reason);
  expect(e.message).toContain(file);
  expect(e.message).toContain(source);
}

/** What every source must do with the same three files. */
async function commonBehaviour(source: ModelSource): Promise<void> {
  expect(await source.readText('config.json')).toBe('{"model_type":"llama","name":"é"}');
  expect(await source.readText('missing.json')).toBeUndefined();
  expect(await source.size('data.bin')).toBe(1000);
  expect(await source.size('missing.bin')).toBeUndefined();
  expect(await source.readRange('data.bin', 0, 1000)).toEqual(BYTES);
  expect(await source.readRange('data.bin', 10, 17)).toEqual(BYTES.subarray(10, 17));
  expect(await source.readRange('data.bin', 999, 1000)).toEqual(BYTES.subarray(999));
  expect(await source.readRange('data.bin', 5, 5)).toEqual(new Uint8Array(0));
  await expectFileError(source.readRange('data.bin', 990, 1001), source.description, 'data.bin', /end/);
  await expectFileError(source.readRange('missing.bin', 0, 4), source.description, 'missing.bin', /no such file/);
  await expectFileError(source.readRange('data.bin', 5, 4), source.description, 'data.bin', /invalid byte range/);
  await expectFileError(
    source.readRange('../data.bin', 0, 4),
    source.description,
    '../data.bin',
    /not a valid file name/,
  );
  await expectFileError(source.size('/etc/passwd'), source.description, '/etc/passwd', /not a valid file name/);
  const file = await openSafetensors(source, 'model.safetensors');
  expect(await file.readTensor('w')).toEqual(new Float32Array([1, 2, 3, 4, 5, 6]));
}

describe('directorySource', () => {
  let dir = '';
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'webtune-source-'));
    await writeFile(join(dir, 'config.json'), '{"model_type":"llama","name":"é"}');
    await writeFile(join(dir, 'data.bin'), BYTES);
    await writeFile(join(dir, 'model.safetensors'), TENSORS);
    await mkdir(join(dir, 'sub'));
    await writeFile(join(dir, 'sub', 'x.txt'), 'inside');
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads text, sizes and byte ranges, and refuses what it should', async () => {
    const source = directorySource(dir);
    expect(source.description).toBe(dir);
    await commonBehaviour(source);
    expect(await source.readText('sub/x.txt')).toBe('inside');
    await expectFileError(source.size('sub'), dir, 'sub', /not a regular file/);
    expect(await directorySource(`${dir}/`).size('data.bin')).toBe(1000);
    expect(await directorySource(join(dir, 'nope')).readText('config.json')).toBeUndefined();
  });

  it('reads a range at the end of a 4 GiB file without reading the rest', async () => {
    // A sparse file: reading it whole would take 4 GiB of memory.
    const big = join(dir, 'big.bin');
    const handle = await open(big, 'w');
    await handle.truncate(2 ** 32);
    await handle.write(Uint8Array.from([1, 2, 3, 4]), 0, 4, 2 ** 32 - 4);
    await handle.close();
    const source = directorySource(dir);
    expect(await source.size('big.bin')).toBe(2 ** 32);
    expect(await source.readRange('big.bin', 2 ** 32 - 6, 2 ** 32)).toEqual(Uint8Array.from([0, 0, 1, 2, 3, 4]));
    await rm(big);
  });
});

describe('urlSource', () => {
  const files: Record<string, Uint8Array> = {
    'config.json': new TextEncoder().encode('{"model_type":"llama","name":"é"}'),
    'data.bin': BYTES,
    'model.safetensors': TENSORS,
    'sub dir/x y.txt': new TextEncoder().encode('spaced'),
    'huge.bin': new Uint8Array(32 * 1024 * 1024),
  };
  let server: Server;
  let base = '';
  const log: string[] = [];
  let hugeBytesSent = 0;

  /** Modes by path prefix: /ok/ honours Range; /norange/ ignores it; /nohead/ has no HEAD and
   * sends no Content-Length on whole responses. */
  function handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://x');
    const [, mode, ...rest] = url.pathname.split('/');
    const name = rest.map(decodeURIComponent).join('/');
    log.push(`${req.method} ${mode}/${name} ${req.headers.range ?? ''}`.trim());
    const body = files[name];
    if (!body) {
      // Single-page-app hosting answers every unknown path with its index page.
      if (mode === 'spa') res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' }).end('<!doctype html>');
      else res.writeHead(404).end('not found');
      return;
    }
    if (req.method === 'HEAD') {
      if (mode === 'nohead') res.writeHead(405).end();
      else res.writeHead(200, { 'Content-Length': body.length, 'Accept-Ranges': 'bytes' }).end();
      return;
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (range && mode !== 'norange') {
      const first = Number(range[1]);
      if (first >= body.length) {
        res.writeHead(416, { 'Content-Range': `bytes */${body.length}` }).end();
        return;
      }
      const last = Math.min(Number(range[2]), body.length - 1);
      res.writeHead(206, {
        'Content-Range': `bytes ${first}-${last}/${body.length}`,
        'Content-Length': last - first + 1,
      });
      res.end(body.subarray(first, last + 1));
      return;
    }
    if (mode === 'nohead') {
      res.writeHead(200, { 'Transfer-Encoding': 'chunked' });
    } else {
      res.writeHead(200, { 'Content-Length': body.length });
    }
    if (name !== 'huge.bin') {
      res.end(body);
      return;
    }
    // Stream the big file slowly enough that a client that stops reading is seen stopping.
    let at = 0;
    const pump = () => {
      while (at < body.length) {
        const chunk = body.subarray(at, at + 65536);
        at += chunk.length;
        hugeBytesSent = at;
        if (!res.write(chunk)) {
          res.once('drain', pump);
          return;
        }
      }
      res.end();
    };
    res.on('close', () => {
      at = body.length;
    });
    pump();
  }

  beforeAll(async () => {
    server = createServer(handle);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  it('reads through HTTP Range requests', async () => {
    const source = urlSource(`${base}/ok`);
    expect(source.description).toBe(`${base}/ok/`);
    await commonBehaviour(source);
    expect(await source.readText('sub dir/x y.txt')).toBe('spaced');
    log.length = 0;
    await source.readRange('data.bin', 10, 20);
    expect(log).toEqual(['GET ok/data.bin bytes=10-19']);
  });

  it('takes a single-page app’s index.html for a missing file as missing', async () => {
    const source = urlSource(`${base}/spa`);
    await commonBehaviour(source);
    expect(await source.readText('model.safetensors.index.json')).toBeUndefined();
  });

  it('finds sizes without HEAD or Content-Length through Content-Range', async () => {
    const source = urlSource(`${base}/nohead/`);
    log.length = 0;
    expect(await source.size('data.bin')).toBe(1000);
    expect(log).toEqual(['HEAD nohead/data.bin', 'GET nohead/data.bin bytes=0-0']);
    expect(await source.size('missing.bin')).toBeUndefined();
    expect(await source.readRange('data.bin', 3, 9)).toEqual(BYTES.subarray(3, 9));
  });

  it('refuses a server that ignores Range, without buffering its whole answer', async () => {
    const source = urlSource(`${base}/norange`);
    await expectFileError(
      source.readRange('data.bin', 10, 20),
      `${base}/norange/`,
      'data.bin',
      /ignored the HTTP Range request/,
    );
    // Asking for a whole file is satisfied by a whole-file answer.
    expect(await source.readRange('data.bin', 0, 1000)).toEqual(BYTES);
    hugeBytesSent = 0;
    await expectFileError(
      source.readRange('huge.bin', 0, 16),
      `${base}/norange/`,
      'huge.bin',
      /ignored the HTTP Range/,
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    console.log(
      `huge.bin: server wrote ${hugeBytesSent} of ${files['huge.bin']?.length} bytes before the client hung up`,
    );
    expect(hugeBytesSent).toBeLessThan(files['huge.bin']?.length as number);
  });

  it('maps HTTP failures to ModelFileError', async () => {
    const failing = urlSource(
      'http://x.invalid/',
      async () => new Response('boom', { status: 500, statusText: 'Server Error' }),
    );
    await expectFileError(failing.readText('config.json'), 'http://x.invalid/', 'config.json', /HTTP 500 Server Error/);
    await expectFileError(failing.readRange('a.bin', 0, 4), 'http://x.invalid/', 'a.bin', /HTTP 500/);
    const offline = urlSource('http://x.invalid/', async () => {
      throw new TypeError('fetch failed');
    });
    await expectFileError(
      offline.size('a.bin'),
      'http://x.invalid/',
      'a.bin',
      /request failed \(TypeError: fetch failed\)/,
    );
    // A server that sends more than it announced is cut off.
    const liar = urlSource('http://x.invalid/', async () => new Response(new Uint8Array(10), { status: 206 }));
    await expectFileError(liar.readRange('a.bin', 0, 4), 'http://x.invalid/', 'a.bin', /more than the 4 bytes/);
    const wrongStart = urlSource(
      'http://x.invalid/',
      async () => new Response(new Uint8Array(4), { status: 206, headers: { 'Content-Range': 'bytes 0-3/10' } }),
    );
    await expectFileError(wrongStart.readRange('a.bin', 4, 8), 'http://x.invalid/', 'a.bin', /server sent from 0/);
  });
});

describe('filesSource', () => {
  const make = () =>
    filesSource([
      new File(['{"model_type":"llama","name":"é"}'], 'config.json'),
      new File([BYTES], 'data.bin'),
      Object.assign(new Blob([TENSORS as BlobPart]), { name: 'model.safetensors' }),
    ]);

  it('reads dropped files by name', async () => {
    const source = make();
    expect(source.description).toBe('dropped files (config.json, data.bin, model.safetensors)');
    await commonBehaviour(source);
  });

  it('refuses two files with the same name', () => {
    expect(() => filesSource([new File(['a'], 'x.json'), new File(['b'], 'x.json')])).toThrow(
      /x\.json in dropped files: given twice/,
    );
  });
});
