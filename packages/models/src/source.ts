import { ModelFileError } from './errors.js';

/**
 * Where a model's files come from: a folder on disk (Node), a base URL (fetch: the Hub or the
 * studio's own server), or files a person dropped into the page. Everything that reads model
 * files (config, tokenizer, safetensors) goes through this interface, so each works everywhere.
 */
export interface ModelSource {
  /** Names the source in error messages: a path, a URL, "dropped files". */
  readonly description: string;
  /** A whole (small) file as text, or undefined when the file does not exist. */
  readText(name: string): Promise<string | undefined>;
  /** A file's size in bytes, or undefined when it does not exist. */
  size(name: string): Promise<number | undefined>;
  /** Bytes [start, end) of a file. Rejects when the file is missing or shorter than `end`. */
  readRange(name: string, start: number, end: number): Promise<Uint8Array>;
}

/**
 * File names are relative paths with '/' between folders ("model.safetensors",
 * "onnx/model.onnx"). Names come from files like model.safetensors.index.json, so a name that
 * climbs out of the model (".." or an absolute path) is refused rather than followed.
 */
export function checkFileName(source: string, name: string): void {
  const bad =
    typeof name !== 'string' ||
    name.length === 0 ||
    name.startsWith('/') ||
    name.includes('\\') ||
    name.includes('\0') ||
    name.split('/').some((part) => part === '' || part === '.' || part === '..');
  if (bad)
    throw new ModelFileError(
      source,
      String(name),
      'not a valid file name inside a model (a relative path without "..")',
    );
}

function checkRange(source: string, name: string, start: number, end: number): void {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    throw new ModelFileError(source, name, `invalid byte range [${start}, ${end})`);
  }
}

// ---------------------------------------------------------------------------------------------
// A folder on disk (Node only)

interface NodeFs {
  open(
    path: string,
    flags: string,
  ): Promise<{
    read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
    close(): Promise<void>;
  }>;
  readFile(path: string, encoding: 'utf8'): Promise<string>;
  stat(path: string): Promise<{ size: number; isFile(): boolean }>;
}

let nodeFs: Promise<NodeFs> | undefined;

/** node:fs/promises, imported on first use by a specifier bundlers leave alone, so browser builds
 * of anything that imports this module never pull in node:fs. */
function loadFs(): Promise<NodeFs> {
  const name = 'node:fs/promises';
  nodeFs ??= import(/* @vite-ignore */ name) as Promise<NodeFs>;
  return nodeFs;
}

function errorCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

const MISSING_CODES = new Set(['ENOENT', 'ENOTDIR']);

/**
 * A model folder on disk, under Node. Reads byte ranges through a file handle, so a tensor read
 * never loads the rest of its file.
 */
export function directorySource(path: string): ModelSource {
  const root = path.endsWith('/') && path.length > 1 ? path.slice(0, -1) : path;
  const description = root;
  const full = (name: string) => {
    checkFileName(description, name);
    return `${root}/${name}`;
  };
  const fail = (name: string, error: unknown): never => {
    if (error instanceof ModelFileError) throw error;
    const code = errorCode(error);
    const reason = code !== undefined && MISSING_CODES.has(code) ? 'no such file' : `cannot be read (${String(error)})`;
    throw new ModelFileError(description, name, reason, { cause: error });
  };

  return {
    description,
    async readText(name) {
      const file = full(name);
      const fs = await loadFs();
      try {
        return await fs.readFile(file, 'utf8');
      } catch (error) {
        if (MISSING_CODES.has(errorCode(error) ?? '')) return undefined;
        return fail(name, error);
      }
    },
    async size(name) {
      const file = full(name);
      const fs = await loadFs();
      let stat: { size: number; isFile(): boolean };
      try {
        stat = await fs.stat(file);
      } catch (error) {
        if (MISSING_CODES.has(errorCode(error) ?? '')) return undefined;
        return fail(name, error);
      }
      if (!stat.isFile()) throw new ModelFileError(description, name, 'is not a regular file');
      return stat.size;
    },
    async readRange(name, start, end) {
      const file = full(name);
      checkRange(description, name, start, end);
      const fs = await loadFs();
      const out = new Uint8Array(end - start);
      let handle: Awaited<ReturnType<NodeFs['open']>>;
      try {
        handle = await fs.open(file, 'r');
      } catch (error) {
        return fail(name, error);
      }
      try {
        let done = 0;
        while (done < out.length) {
          const { bytesRead } = await handle.read(out, done, out.length - done, start + done);
          if (bytesRead === 0) {
            throw new ModelFileError(
              description,
              name,
              `file ends at byte ${start + done}, before the end of the requested range [${start}, ${end})`,
            );
          }
          done += bytesRead;
        }
      } catch (error) {
        fail(name, error);
      } finally {
        await handle.close();
      }
      return out;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// A base URL (HTTP with Range requests)

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

/** Parses "bytes first-last/total" (total may be "*") or "bytes * /total". */
function parseContentRange(header: string | null): { first?: number; last?: number; total?: number } | undefined {
  if (!header) return undefined;
  const m = /^\s*bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)\s*$/i.exec(header);
  if (!m) return undefined;
  const num = (s: string | undefined) => (s === undefined || s === '*' ? undefined : Number(s));
  return { first: num(m[1]), last: num(m[2]), total: num(m[3]) };
}

function contentLength(res: Response): number | undefined {
  const header = res.headers.get('content-length');
  if (header === null || !/^\s*\d+\s*$/.test(header)) return undefined;
  // A compressed body's length says nothing about the file's size.
  const encoding = res.headers.get('content-encoding');
  if (encoding && encoding.toLowerCase() !== 'identity') return undefined;
  return Number(header);
}

async function discard(res: Response): Promise<void> {
  try {
    await res.body?.cancel();
  } catch {
    // The body is being thrown away; a failure to cancel it changes nothing.
  }
}

/**
 * Reads a response body into exactly `expected` bytes, failing (and cancelling the download) as
 * soon as the server sends more, so a misbehaving server cannot make us buffer a whole file.
 */
async function readExactly(res: Response, expected: number, source: string, name: string): Promise<Uint8Array> {
  const out = new Uint8Array(expected);
  if (!res.body) {
    const length = contentLength(res);
    if (length !== expected) {
      throw new ModelFileError(
        source,
        name,
        `the server sent ${length ?? 'an unknown number of'} bytes, expected ${expected}`,
      );
    }
    const bytes = new Uint8Array(await res.arrayBuffer());
    if (bytes.length !== expected) {
      throw new ModelFileError(source, name, `the server sent ${bytes.length} bytes, expected ${expected}`);
    }
    return bytes;
  }
  const reader = res.body.getReader();
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (n + value.length > expected) {
      await reader.cancel().catch(() => undefined);
      throw new ModelFileError(source, name, `the server sent more than the ${expected} bytes asked for`);
    }
    out.set(value, n);
    n += value.length;
  }
  if (n !== expected) throw new ModelFileError(source, name, `the server sent ${n} bytes, expected ${expected}`);
  return out;
}

/**
 * Single-page-app hosting (vite preview, Netlify, many static hosts) answers a missing file with
 * its index.html and status 200. A model folder holds no HTML, so an HTML answer for any other
 * name means the file does not exist (optional files such as chat_template.jinja or the sharded
 * index are probed this way).
 */
function isFallbackPage(name: string, res: Response): boolean {
  const type = res.headers.get('content-type') ?? '';
  return /^text\/html\b/i.test(type) && !/\.html?$/i.test(name);
}

const RANGE_IGNORED =
  'the server ignored the HTTP Range request and started sending the whole file; serve the model ' +
  'from a server that supports byte ranges (HTTP 206), or download the files and open them locally';

/**
 * Files under a base URL ("https://huggingface.co/<repo>/resolve/main/", or the studio's own
 * server). Tensors are read with HTTP Range requests; a server that answers a range with the
 * whole file is refused (the body is cancelled) instead of being buffered.
 */
export function urlSource(baseUrl: string, fetchImpl?: FetchLike): ModelSource {
  const base = baseUrl.endsWith('/') ? baseUrl : `${baseUrl}/`;
  const description = base;
  const doFetch: FetchLike = fetchImpl ?? ((input, init) => globalThis.fetch(input, init));
  const url = (name: string) => {
    checkFileName(description, name);
    return base + name.split('/').map(encodeURIComponent).join('/');
  };
  const request = async (name: string, init: RequestInit): Promise<Response> => {
    const target = url(name);
    try {
      return await doFetch(target, init);
    } catch (error) {
      throw new ModelFileError(description, name, `request failed (${String(error)})`, { cause: error });
    }
  };
  const httpError = (name: string, res: Response) =>
    new ModelFileError(description, name, `HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}`);

  const readText = async (name: string): Promise<string | undefined> => {
    const res = await request(name, { method: 'GET' });
    if (res.status === 404 || res.status === 410) {
      await discard(res);
      return undefined;
    }
    if (!res.ok) {
      await discard(res);
      throw httpError(name, res);
    }
    if (isFallbackPage(name, res)) {
      await discard(res);
      return undefined;
    }
    return await res.text();
  };
  const size = async (name: string): Promise<number | undefined> => {
    const head = await request(name, { method: 'HEAD' });
    if (head.status === 404 || head.status === 410) return undefined;
    if (head.ok && isFallbackPage(name, head)) return undefined;
    if (head.ok) {
      const length = contentLength(head);
      if (length !== undefined) return length;
    }
    // No HEAD, or no length in it: ask for the first byte and read the total off Content-Range.
    const res = await request(name, { method: 'GET', headers: { Range: 'bytes=0-0' } });
    if (res.status === 404 || res.status === 410) {
      await discard(res);
      return undefined;
    }
    const range = parseContentRange(res.headers.get('content-range'));
    if ((res.status === 206 || res.status === 416) && range?.total !== undefined) {
      await discard(res);
      return range.total;
    }
    if (res.status === 200) {
      const length = contentLength(res);
      await discard(res);
      if (length !== undefined) return length;
      throw new ModelFileError(description, name, 'the server reports no size for this file (no Content-Length)');
    }
    await discard(res);
    throw httpError(name, res);
  };
  const readRange = async (name: string, start: number, end: number): Promise<Uint8Array> => {
    checkRange(description, name, start, end);
    const wanted = end - start;
    if (wanted === 0) {
      if ((await size(name)) === undefined) throw new ModelFileError(description, name, 'no such file');
      return new Uint8Array(0);
    }
    const res = await request(name, { method: 'GET', headers: { Range: `bytes=${start}-${end - 1}` } });
    if (res.status === 404 || res.status === 410) {
      await discard(res);
      throw new ModelFileError(description, name, 'no such file');
    }
    if (res.status === 416) {
      const total = parseContentRange(res.headers.get('content-range'))?.total;
      await discard(res);
      throw new ModelFileError(
        description,
        name,
        `bytes [${start}, ${end}) lie past the end of the file${total === undefined ? '' : ` (${total} bytes)`}`,
      );
    }
    if ((res.status === 206 || res.status === 200) && isFallbackPage(name, res)) {
      await discard(res);
      throw new ModelFileError(description, name, 'no such file');
    }
    if (res.status === 206) {
      const range = parseContentRange(res.headers.get('content-range'));
      if (range?.first !== undefined && range.first !== start) {
        await discard(res);
        throw new ModelFileError(
          description,
          name,
          `asked for bytes from ${start}, the server sent from ${range.first}`,
        );
      }
      if (range?.last !== undefined && range.last !== end - 1) {
        await discard(res);
        throw new ModelFileError(
          description,
          name,
          `file ends before byte ${end}: the server sent bytes [${start}, ${range.last + 1})` +
            (range.total === undefined ? '' : ` of ${range.total}`),
        );
      }
      return readExactly(res, wanted, description, name);
    }
    if (res.status === 200) {
      // A whole-file answer is acceptable only when the whole file is what was asked for.
      if (start === 0 && contentLength(res) === end) return readExactly(res, wanted, description, name);
      await discard(res);
      throw new ModelFileError(description, name, RANGE_IGNORED);
    }
    await discard(res);
    throw httpError(name, res);
  };
  return { description, readText, size, readRange };
}

// ---------------------------------------------------------------------------------------------
// Files a person dropped into the page (or any named Blobs)

/** A File, or any Blob given a name. */
export type NamedBlob = Blob & { readonly name: string };

/**
 * Files a person dropped or picked (File objects), found by their name. Ranges are read with
 * Blob.slice, so nothing is loaded whole.
 */
export function filesSource(files: Iterable<NamedBlob>, description?: string): ModelSource {
  const byName = new Map<string, NamedBlob>();
  for (const file of files) {
    const desc = description ?? 'dropped files';
    if (byName.has(file.name)) throw new ModelFileError(desc, file.name, 'given twice');
    byName.set(file.name, file);
  }
  const names = [...byName.keys()];
  const listed = names.length > 6 ? `${names.slice(0, 5).join(', ')} and ${names.length - 5} more` : names.join(', ');
  const desc = description ?? `dropped files (${listed})`;
  const get = (name: string) => {
    checkFileName(desc, name);
    return byName.get(name);
  };
  return {
    description: desc,
    async readText(name) {
      return get(name)?.text();
    },
    async size(name) {
      return get(name)?.size;
    },
    async readRange(name, start, end) {
      const file = get(name);
      if (!file) throw new ModelFileError(desc, name, 'no such file');
      checkRange(desc, name, start, end);
      if (end > file.size) {
        throw new ModelFileError(
          desc,
          name,
          `bytes [${start}, ${end}) lie past the end of the file (${file.size} bytes)`,
        );
      }
      try {
        return new Uint8Array(await file.slice(start, end).arrayBuffer());
      } catch (error) {
        throw new ModelFileError(desc, name, `cannot be read (${String(error)})`, { cause: error });
      }
    },
  };
}

// ---------------------------------------------------------------------------------------------
// A folder the person picked (File System Access API)

function isNotFound(error: unknown): boolean {
  const name = (error as { name?: unknown } | null)?.name;
  return name === 'NotFoundError' || name === 'TypeMismatchError';
}

/**
 * A model folder from showDirectoryPicker() (or a dropped folder's handle): files found by their
 * path through the handle's subfolders, read with File.slice, so nothing is loaded whole.
 */
export function directoryHandleSource(handle: FileSystemDirectoryHandle): ModelSource {
  const description = `folder ${handle.name}`;
  const files = new Map<string, Promise<File | undefined>>();
  const file = (name: string): Promise<File | undefined> => {
    checkFileName(description, name);
    let found = files.get(name);
    if (!found) {
      found = (async () => {
        const parts = name.split('/');
        let dir = handle;
        try {
          for (const part of parts.slice(0, -1)) dir = await dir.getDirectoryHandle(part);
          return await (await dir.getFileHandle(parts[parts.length - 1] as string)).getFile();
        } catch (error) {
          if (isNotFound(error)) return undefined;
          throw new ModelFileError(description, name, `cannot be read (${String(error)})`, { cause: error });
        }
      })();
      files.set(name, found);
    }
    return found;
  };
  return {
    description,
    async readText(name) {
      return (await file(name))?.text();
    },
    async size(name) {
      return (await file(name))?.size;
    },
    async readRange(name, start, end) {
      const f = await file(name);
      if (!f) throw new ModelFileError(description, name, 'no such file');
      checkRange(description, name, start, end);
      if (end > f.size)
        throw new ModelFileError(
          description,
          name,
          `bytes [${start}, ${end}) lie past the end of the file (${f.size} bytes)`,
        );
      return new Uint8Array(await f.slice(start, end).arrayBuffer());
    },
  };
}
