/**
 * Models from the Hugging Face Hub or any URL, downloaded once with byte progress and kept for
 * offline use: in browsers in the Cache API (one cache, "webtune-models"; the Cache API keeps
 * responses on disk and hands them back as disk-backed Blobs, so a tensor read is a Blob.slice,
 * and it is cleared with the site's other data), under Node in a cache folder
 * ($WEBTUNE_CACHE, else ~/.cache/webtune/models).
 *
 * A model is cached complete or not at all: its files are stored first and a manifest (the file
 * list with sizes) last, and only a model with a manifest is read from the cache. A download that
 * fails or is aborted leaves no manifest, so the next load downloads again.
 *
 * Before any weight is downloaded, config.json is read and checked: a repository that does not
 * exist, is gated or private, holds no safetensors weights, or has an architecture webtune does
 * not support fails at once, naming the repository and what is supported.
 *
 * The Hub's file listing comes from @huggingface/hub (listFiles: sizes, errors, pagination); files
 * are fetched from the Hub's resolve URLs as streams, to report progress and write the cache as
 * bytes arrive (the library's downloadFile returns a finished Blob, with no progress).
 */
import { WebtuneError } from '@webtune/core';
import { ConfigError, parseModelConfig, SUPPORTED_ARCHITECTURES } from './config.js';
import { ModelFileError } from './errors.js';
import { checkFileName, directorySource, type FetchLike, type ModelSource, urlSource } from './source.js';

export interface DownloadProgress {
  readonly file: string;
  readonly loaded: number;
  readonly total: number;
}

export interface DownloadOptions {
  /** Hub revision (branch, tag or commit). Default "main". */
  readonly revision?: string;
  /** Hub endpoint (a mirror, a test server). Default https://huggingface.co. */
  readonly endpoint?: string;
  /** Keep the files for offline use (default true); false reads the files in place with Range requests. */
  readonly cache?: boolean;
  /** Node: the cache folder. */
  readonly cacheDir?: string;
  readonly fetch?: FetchLike;
  readonly signal?: AbortSignal;
  readonly onProgress?: (p: DownloadProgress) => void;
}

/** The Hub said no: the repository is missing, gated or private. */
export class HubRepoError extends WebtuneError {
  constructor(
    readonly repo: string,
    readonly status: number,
    readonly reason: string,
  ) {
    super(`Hugging Face repository ${repo}: ${reason}`);
  }
}

const CACHE_NAME = 'webtune-models';
const MANIFEST = 'webtune-manifest.json';
const TEXT_FILES = [
  'config.json',
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'chat_template.jinja',
  'special_tokens_map.json',
];
const REQUIRED = new Set(['config.json', 'tokenizer.json']);
const INDEX = 'model.safetensors.index.json';
const SINGLE = 'model.safetensors';

interface Manifest {
  readonly id: string;
  readonly base: string;
  readonly files: readonly { readonly name: string; readonly size: number }[];
  readonly created: number;
}

export interface CachedModel {
  readonly id: string;
  readonly bytes: number;
  readonly created: number;
}

function isNode(): boolean {
  return typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node === 'string';
}

function hasCacheStorage(): boolean {
  return typeof (globalThis as { caches?: unknown }).caches !== 'undefined';
}

// ---------------------------------------------------------------------------------------------
// The two stores

interface Store {
  /** The manifest of a complete model, or undefined. */
  manifest(base: string): Promise<Manifest | undefined>;
  /** Stores a file from a stream; rejects (storing nothing) if the stream fails. */
  put(base: string, name: string, body: ReadableStream<Uint8Array>, size: number): Promise<void>;
  putManifest(manifest: Manifest): Promise<void>;
  source(manifest: Manifest): ModelSource;
  list(): Promise<Manifest[]>;
  remove(base: string): Promise<boolean>;
}

function manifestUrl(base: string): string {
  return base + MANIFEST;
}

class CacheApiStore implements Store {
  private open(): Promise<Cache> {
    return caches.open(CACHE_NAME);
  }

  async manifest(base: string): Promise<Manifest | undefined> {
    const res = await (await this.open()).match(manifestUrl(base));
    return res ? ((await res.json()) as Manifest) : undefined;
  }

  async put(base: string, name: string, body: ReadableStream<Uint8Array>, size: number): Promise<void> {
    const headers: Record<string, string> = { 'Content-Type': 'application/octet-stream' };
    if (size > 0) headers['Content-Length'] = String(size);
    await (await this.open()).put(base + name, new Response(body, { headers }));
  }

  async putManifest(manifest: Manifest): Promise<void> {
    await (await this.open()).put(
      manifestUrl(manifest.base),
      new Response(JSON.stringify(manifest), { headers: { 'Content-Type': 'application/json' } }),
    );
  }

  source(manifest: Manifest): ModelSource {
    const sizes = new Map(manifest.files.map((f) => [f.name, f.size]));
    const blobs = new Map<string, Promise<Blob | undefined>>();
    const description = `${manifest.id} (cached)`;
    const blob = (name: string) => {
      checkFileName(description, name);
      if (!sizes.has(name)) return Promise.resolve(undefined);
      let b = blobs.get(name);
      if (!b) {
        b = this.open()
          .then((cache) => cache.match(manifest.base + name))
          .then((res) => res?.blob());
        blobs.set(name, b);
      }
      return b;
    };
    return {
      description,
      async readText(name) {
        return (await blob(name))?.text();
      },
      async size(name) {
        checkFileName(description, name);
        return sizes.get(name);
      },
      async readRange(name, start, end) {
        const b = await blob(name);
        if (!b) throw new ModelFileError(description, name, 'no such file');
        if (end > b.size || start < 0 || end < start)
          throw new ModelFileError(
            description,
            name,
            `bytes [${start}, ${end}) lie outside the file (${b.size} bytes)`,
          );
        return new Uint8Array(await b.slice(start, end).arrayBuffer());
      },
    };
  }

  async list(): Promise<Manifest[]> {
    const cache = await this.open();
    const out: Manifest[] = [];
    for (const req of await cache.keys()) {
      if (!req.url.endsWith(`/${MANIFEST}`)) continue;
      const res = await cache.match(req);
      if (res) out.push((await res.json()) as Manifest);
    }
    return out;
  }

  async remove(base: string): Promise<boolean> {
    const cache = await this.open();
    let removed = false;
    for (const req of await cache.keys()) {
      if (req.url.startsWith(base)) removed = (await cache.delete(req)) || removed;
    }
    return removed;
  }
}

type Fs = typeof import('node:fs/promises');
let fsModule: Promise<Fs> | undefined;
function nodeFs(): Promise<Fs> {
  const name = 'node:fs/promises';
  fsModule ??= import(/* @vite-ignore */ name) as Promise<Fs>;
  return fsModule;
}

class FolderStore implements Store {
  constructor(private readonly root: string) {}

  private dir(base: string): string {
    return `${this.root}/${encodeURIComponent(base)}`;
  }

  async manifest(base: string): Promise<Manifest | undefined> {
    const fs = await nodeFs();
    try {
      return JSON.parse(await fs.readFile(`${this.dir(base)}/${MANIFEST}`, 'utf8')) as Manifest;
    } catch {
      return undefined;
    }
  }

  async put(base: string, name: string, body: ReadableStream<Uint8Array>): Promise<void> {
    const fs = await nodeFs();
    const path = `${this.dir(base)}/${name}`;
    await fs.mkdir(path.slice(0, path.lastIndexOf('/')), { recursive: true });
    // Unique per writer: two processes downloading the same model do not write one file.
    const partial = `${path}.partial-${(globalThis as { process?: { pid?: number } }).process?.pid ?? 0}-${Math.random().toString(36).slice(2)}`;
    const handle = await fs.open(partial, 'w');
    try {
      const reader = body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        await handle.write(value);
      }
    } catch (error) {
      await handle.close();
      await fs.rm(partial, { force: true });
      throw error;
    }
    await handle.close();
    await fs.rename(partial, path);
  }

  async putManifest(manifest: Manifest): Promise<void> {
    const fs = await nodeFs();
    const path = `${this.dir(manifest.base)}/${MANIFEST}`;
    await fs.writeFile(`${path}.partial`, JSON.stringify(manifest, null, 2));
    await fs.rename(`${path}.partial`, path);
  }

  source(manifest: Manifest): ModelSource {
    const inner = directorySource(this.dir(manifest.base));
    return { ...inner, description: `${manifest.id} (cached in ${this.dir(manifest.base)})` };
  }

  async list(): Promise<Manifest[]> {
    const fs = await nodeFs();
    const out: Manifest[] = [];
    let entries: string[] = [];
    try {
      entries = await fs.readdir(this.root);
    } catch {
      return out;
    }
    for (const e of entries) {
      const m = await this.manifest(decodeURIComponent(e));
      if (m) out.push(m);
    }
    return out;
  }

  async remove(base: string): Promise<boolean> {
    const fs = await nodeFs();
    const dir = this.dir(base);
    const existed = await fs.stat(dir).then(
      () => true,
      () => false,
    );
    await fs.rm(dir, { recursive: true, force: true });
    return existed;
  }
}

async function defaultCacheDir(): Promise<string> {
  const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env ?? {};
  if (env.WEBTUNE_CACHE) return `${env.WEBTUNE_CACHE}/models`;
  const os = (await import(/* @vite-ignore */ 'node:os')) as typeof import('node:os');
  return `${os.homedir()}/.cache/webtune/models`;
}

async function openStore(cacheDir: string | undefined): Promise<Store | undefined> {
  if (hasCacheStorage()) return new CacheApiStore();
  if (isNode()) return new FolderStore(cacheDir ?? (await defaultCacheDir()));
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Downloading

const HUB_ID = /^[\w.-]+\/[\w.-]+$/;

/** The resolve URL base of a Hub repository. */
export function hubBase(repo: string, options: Pick<DownloadOptions, 'revision' | 'endpoint'> = {}): string {
  const endpoint = (options.endpoint ?? 'https://huggingface.co').replace(/\/+$/, '');
  return `${endpoint}/${repo}/resolve/${encodeURIComponent(options.revision ?? 'main')}/`;
}

/** Checks config.json's architecture before the weights are fetched. */
function checkConfig(text: string, where: string): void {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new ConfigError(`${where}/config.json`, undefined, `is not valid JSON: ${(error as Error).message}`);
  }
  const architectures = (json as { architectures?: unknown }).architectures;
  const arch = Array.isArray(architectures) ? architectures[0] : undefined;
  if (typeof arch !== 'string' || !(arch in SUPPORTED_ARCHITECTURES)) {
    throw new ModelFileError(
      where,
      'config.json',
      `architecture ${JSON.stringify(arch ?? null)} is not supported; webtune trains ${Object.keys(SUPPORTED_ARCHITECTURES).join(', ')} (SmolLM2, Llama 3.2, TinyLlama, Qwen2.5, Qwen3, GPT-2)`,
    );
  }
  parseModelConfig(json, `${where}/config.json`);
}

/**
 * Streams `res`'s body, counting bytes for progress; `counter.loaded` is the file's size once the
 * stream ends. `total` is the expected size (0 when unknown: then it is not checked).
 */
function counted(
  res: Response,
  file: string,
  total: number,
  options: DownloadOptions,
  counter: { loaded: number },
  where: string,
): ReadableStream<Uint8Array> {
  let last = 0;
  const body = res.body as ReadableStream<Uint8Array>;
  return body.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        counter.loaded += chunk.length;
        const now = Date.now();
        if (now - last > 100) {
          last = now;
          options.onProgress?.({ file, loaded: counter.loaded, total: Math.max(total, counter.loaded) });
        }
        controller.enqueue(chunk);
      },
      flush() {
        if (total > 0 && counter.loaded !== total)
          throw new ModelFileError(where, file, `the download ended after ${counter.loaded} of ${total} bytes`);
        options.onProgress?.({ file, loaded: counter.loaded, total: counter.loaded });
      },
    }),
    options.signal ? { signal: options.signal } : {},
  );
}

/** The body's length in bytes, when the server states it (a compressed body's length is not the file's). */
function bodyLength(res: Response): number {
  const encoding = res.headers.get('content-encoding');
  if (encoding && encoding.toLowerCase() !== 'identity') return 0;
  const length = Number(res.headers.get('content-length') ?? Number.NaN);
  return Number.isSafeInteger(length) && length >= 0 ? length : 0;
}

async function get(url: string, options: DownloadOptions, where: string, name: string): Promise<Response | undefined> {
  // (The Hub lists a gated repository's files to anyone and refuses the downloads: X-Error-Code says so.)
  const doFetch = options.fetch ?? ((u: string, i?: RequestInit) => globalThis.fetch(u, i));
  let res: Response;
  try {
    res = await doFetch(url, options.signal ? { signal: options.signal } : {});
  } catch (error) {
    if ((error as { name?: string }).name === 'AbortError') throw error;
    throw new ModelFileError(where, name, `could not be downloaded (${String(error)}); are you offline?`, {
      cause: error,
    });
  }
  if (res.status === 404) {
    await res.body?.cancel();
    return undefined;
  }
  if (!res.ok) {
    await res.body?.cancel();
    const code = res.headers.get('x-error-code');
    if (code === 'GatedRepo' || ((res.status === 401 || res.status === 403) && code !== 'RepoNotFound'))
      throw new HubRepoError(
        where,
        res.status,
        'is gated or private: accept its terms on huggingface.co and download it yourself, then open the folder',
      );
    if (code === 'RepoNotFound') throw new HubRepoError(where, res.status, 'does not exist');
    throw new ModelFileError(where, name, `HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}`);
  }
  const type = res.headers.get('content-type') ?? '';
  if (/^text\/html\b/i.test(type)) {
    // A single-page app's index.html for a missing file.
    await res.body?.cancel();
    return undefined;
  }
  return res;
}

/** The files of a model: the text files present and the safetensors weights (single or sharded). */
async function weightFiles(
  readIndex: () => Promise<string | undefined>,
  where: string,
  hasSingle: boolean,
): Promise<string[]> {
  const index = await readIndex();
  if (index !== undefined) {
    let map: Record<string, string>;
    try {
      map = (JSON.parse(index) as { weight_map: Record<string, string> }).weight_map;
    } catch (error) {
      throw new ModelFileError(where, INDEX, `is not valid JSON (${(error as Error).message})`);
    }
    return [INDEX, ...new Set(Object.values(map))];
  }
  if (hasSingle) return [SINGLE];
  throw new ModelFileError(
    where,
    SINGLE,
    'not found: webtune reads safetensors weights (model.safetensors or a sharded model.safetensors.index.json)',
  );
}

async function listHub(repo: string, options: DownloadOptions): Promise<Map<string, number>> {
  const { listFiles } = await import('@huggingface/hub');
  const sizes = new Map<string, number>();
  try {
    for await (const entry of listFiles({
      repo: { type: 'model', name: repo },
      revision: options.revision ?? 'main',
      hubUrl: (options.endpoint ?? 'https://huggingface.co').replace(/\/+$/, ''),
      ...(options.fetch ? { fetch: options.fetch as typeof fetch } : {}),
    })) {
      if (entry.type === 'file') sizes.set(entry.path, entry.lfs?.size ?? entry.size);
    }
  } catch (error) {
    const status = (error as { statusCode?: number }).statusCode;
    const said = `${(error as { data?: { error?: string } }).data?.error ?? ''} ${(error as Error).message ?? ''}`;
    // Without a token the Hub answers 401 both for a private repository and for one that does not
    // exist; its message tells them apart.
    if (status === 404 || /repository not found/i.test(said))
      throw new HubRepoError(
        repo,
        status ?? 404,
        'does not exist (check the spelling: "owner/name", as on huggingface.co)',
      );
    if (/revision not found|invalid rev/i.test(said))
      throw new HubRepoError(repo, status ?? 404, `has no revision ${JSON.stringify(options.revision ?? 'main')}`);
    if (status === 401 || status === 403)
      throw new HubRepoError(
        repo,
        status,
        'is gated or private: webtune downloads public models only; download it yourself and open the folder',
      );
    if (status !== undefined) throw new HubRepoError(repo, status, `the Hub answered HTTP ${status}`);
    throw new ModelFileError(repo, 'file list', `the Hub could not be reached (${String(error)}); are you offline?`, {
      cause: error,
    });
  }
  return sizes;
}

/**
 * Downloads a model folder under `base` into the cache (module header) and returns its manifest.
 * `sizes`: the files and sizes when known (the Hub's listing), else each file is probed.
 */
async function download(
  store: Store,
  id: string,
  base: string,
  sizes: Map<string, number> | undefined,
  options: DownloadOptions,
): Promise<Manifest> {
  const where = id;
  const files: { name: string; size: number }[] = [];
  const fetchInto = async (name: string, required: boolean): Promise<boolean> => {
    if (sizes && !sizes.has(name)) {
      if (required) throw new ModelFileError(where, name, 'not found in the repository');
      return false;
    }
    const res = await get(base + name, options, where, name);
    if (!res) {
      if (required) throw new ModelFileError(where, name, 'not found');
      return false;
    }
    const size = sizes?.get(name) ?? bodyLength(res);
    if (name === 'config.json' || name === INDEX) {
      const text = await res.text();
      if (name === 'config.json') checkConfig(text, where);
      const bytes = new TextEncoder().encode(text);
      await store.put(base, name, new Blob([bytes]).stream(), bytes.length);
      files.push({ name, size: bytes.length });
      options.onProgress?.({ file: name, loaded: bytes.length, total: bytes.length });
      return true;
    }
    const counter = { loaded: 0 };
    await store.put(base, name, counted(res, name, size, options, counter, where), size);
    files.push({ name, size: counter.loaded });
    return true;
  };
  await fetchInto('config.json', true);
  for (const name of TEXT_FILES) if (name !== 'config.json') await fetchInto(name, REQUIRED.has(name));
  const weights = await weightFiles(
    async () => {
      if (!(await fetchInto(INDEX, false))) return undefined;
      // Read back from the store (the manifest is not written yet: the model is not complete).
      return store.source({ id, base, files, created: 0 }).readText(INDEX);
    },
    where,
    sizes ? sizes.has(SINGLE) : true,
  );
  for (const name of weights) if (name !== INDEX) await fetchInto(name, true);
  const manifest: Manifest = { id, base, files, created: Date.now() };
  await store.putManifest(manifest);
  return manifest;
}

/** download(), removing what it stored when it fails (an incomplete model only takes space). */
async function downloadOrClean(
  store: Store,
  id: string,
  base: string,
  sizes: Map<string, number> | undefined,
  options: DownloadOptions,
): Promise<Manifest> {
  try {
    return await download(store, id, base, sizes, options);
  } catch (error) {
    await store.remove(base).catch(() => undefined);
    throw error;
  }
}

export interface OpenedModelSource {
  readonly source: ModelSource;
  /** The Hub id or URL, for base_model_name_or_path. */
  readonly id: string;
  /** True when it was read from the cache without any download. */
  readonly fromCache: boolean;
}

/**
 * A Hub repository ("HuggingFaceTB/SmolLM2-135M-Instruct") as a ModelSource, from the cache when
 * it is there (no network at all), else downloaded into it (module header).
 */
export async function hubModelSource(repo: string, options: DownloadOptions = {}): Promise<OpenedModelSource> {
  if (!HUB_ID.test(repo) || repo.split('/').some((p) => p === '.' || p === '..'))
    throw new HubRepoError(repo, 0, 'is not a repository id (expected "owner/name")');
  const base = hubBase(repo, options);
  if (options.cache === false) return { source: urlSource(base, options.fetch), id: repo, fromCache: false };
  const store = await openStore(options.cacheDir);
  if (!store) return { source: urlSource(base, options.fetch), id: repo, fromCache: false };
  const cached = await store.manifest(base);
  if (cached) return { source: store.source(cached), id: repo, fromCache: true };
  const sizes = await listHub(repo, options);
  const manifest = await downloadOrClean(store, repo, base, sizes, options);
  return { source: store.source(manifest), id: repo, fromCache: false };
}

/** A model folder under a URL (the studio's bundled model, a mirror), cached the same way. */
export async function cachedUrlSource(url: string, options: DownloadOptions = {}): Promise<OpenedModelSource> {
  const base = url.endsWith('/') ? url : `${url}/`;
  if (options.cache === false) return { source: urlSource(base, options.fetch), id: url, fromCache: false };
  const store = await openStore(options.cacheDir);
  if (!store) return { source: urlSource(base, options.fetch), id: url, fromCache: false };
  const cached = await store.manifest(base);
  if (cached) return { source: store.source(cached), id: url, fromCache: true };
  const manifest = await downloadOrClean(store, url, base, undefined, options);
  return { source: store.source(manifest), id: url, fromCache: false };
}

/** Models kept for offline use, newest first. */
export async function listCachedModels(options: Pick<DownloadOptions, 'cacheDir'> = {}): Promise<CachedModel[]> {
  const store = await openStore(options.cacheDir);
  if (!store) return [];
  return (await store.list())
    .map((m) => ({ id: m.id, bytes: m.files.reduce((n, f) => n + f.size, 0), created: m.created }))
    .sort((a, b) => b.created - a.created);
}

/** Removes a cached model (by the id listCachedModels gives); false when it was not cached. */
export async function deleteCachedModel(id: string, options: Pick<DownloadOptions, 'cacheDir'> = {}): Promise<boolean> {
  const store = await openStore(options.cacheDir);
  if (!store) return false;
  const manifest = (await store.list()).find((m) => m.id === id);
  return manifest ? store.remove(manifest.base) : false;
}
