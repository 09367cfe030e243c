/**
 * The trainer's storage in a folder (Node: the CLI and server-side use). Adapters are plain PEFT
 * folders, so PEFT, vLLM and llama.cpp's converter read them where they lie:
 *
 *   <root>/adapters/<name>/adapter_config.json, adapter_model.safetensors, webtune.json (the entry)
 *   <root>/checkpoints/<name>/checkpoint.json (meta), state.safetensors (tensors)
 *
 * Names are URI-encoded into folder names. Every save writes a new folder beside the old one and
 * swaps it in with renames: the old folder is renamed aside (`.old-<name>-<n>`) only once the new
 * one is complete, and deleted after the new one is in place. A crash between the two renames
 * leaves the old folder aside; the next access puts it back. So a save either happened or did not.
 */
import { directorySource, openSafetensors, serializeSafetensors } from '@webtune/models';
import { AdapterExistsError, AdapterNotFoundError, checkName, isQuotaError, StorageQuotaError } from './errors.js';
import type { AdapterEntry, AdapterFiles, CheckpointMeta, CheckpointRecord, TrainerStorage } from './types.js';

type Fs = typeof import('node:fs/promises');

let fsModule: Promise<Fs> | undefined;
/** node:fs/promises by a specifier bundlers leave alone (this module is never used in a browser). */
function fs(): Promise<Fs> {
  const name = 'node:fs/promises';
  fsModule ??= import(/* @vite-ignore */ name) as Promise<Fs>;
  return fsModule;
}

const ENTRY = 'webtune.json';
const CONFIG = 'adapter_config.json';
const WEIGHTS = 'adapter_model.safetensors';
const META = 'checkpoint.json';
const STATE = 'state.safetensors';

/** A folder name for any name: URI-encoded, with a leading dot encoded too (no hidden or '..'). */
function folderName(name: string): string {
  return encodeURIComponent(name).replace(/^\./, '%2E').replaceAll('*', '%2A');
}

function isMissing(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

let unique = 0;

export class DirectoryStorage implements TrainerStorage {
  readonly description: string;

  constructor(readonly root: string) {
    this.description = `folder ${root}`;
  }

  private path(kind: 'adapters' | 'checkpoints', name: string): string {
    return `${this.root}/${kind}/${folderName(name)}`;
  }

  /** Puts back a folder left aside by a save that was interrupted between its two renames. */
  private async recover(kind: 'adapters' | 'checkpoints', name: string): Promise<void> {
    const f = await fs();
    const parent = `${this.root}/${kind}`;
    const target = this.path(kind, name);
    let entries: string[];
    try {
      entries = await f.readdir(parent);
    } catch (error) {
      if (isMissing(error)) return;
      throw error;
    }
    const aside = entries.filter((e) => e.startsWith(`.old-${folderName(name)}-`));
    if (aside.length === 0) return;
    const exists = await f.stat(target).then(
      () => true,
      () => false,
    );
    for (const [i, folder] of aside.entries()) {
      if (!exists && i === aside.length - 1) await f.rename(`${parent}/${folder}`, target);
      else await f.rm(`${parent}/${folder}`, { recursive: true, force: true });
    }
  }

  /** Writes `files` into a fresh folder, then swaps it in for `kind/name` (module header). */
  private async replace(
    kind: 'adapters' | 'checkpoints',
    name: string,
    files: Record<string, string | Uint8Array>,
    what: string,
  ): Promise<void> {
    const f = await fs();
    const parent = `${this.root}/${kind}`;
    const target = this.path(kind, name);
    const id = `${process.pid}-${Date.now()}-${unique++}`;
    const fresh = `${parent}/.new-${folderName(name)}-${id}`;
    const aside = `${parent}/.old-${folderName(name)}-${id}`;
    const bytes = Object.values(files).reduce((n, v) => n + (typeof v === 'string' ? v.length : v.byteLength), 0);
    try {
      await f.mkdir(fresh, { recursive: true });
      for (const [file, data] of Object.entries(files)) await f.writeFile(`${fresh}/${file}`, data);
    } catch (error) {
      await f.rm(fresh, { recursive: true, force: true });
      if (isQuotaError(error)) throw new StorageQuotaError(what, bytes, { cause: error });
      throw error;
    }
    let moved = false;
    try {
      await f.rename(target, aside);
      moved = true;
    } catch (error) {
      if (!isMissing(error)) {
        await f.rm(fresh, { recursive: true, force: true });
        throw error;
      }
    }
    await f.rename(fresh, target);
    if (moved) await f.rm(aside, { recursive: true, force: true });
  }

  private async readJson<T>(file: string): Promise<T | undefined> {
    const f = await fs();
    try {
      return JSON.parse(await f.readFile(file, 'utf8')) as T;
    } catch (error) {
      if (isMissing(error)) return undefined;
      throw error;
    }
  }

  private async names(kind: 'adapters' | 'checkpoints'): Promise<string[]> {
    const f = await fs();
    let entries: string[];
    try {
      entries = await f.readdir(`${this.root}/${kind}`);
    } catch (error) {
      if (isMissing(error)) return [];
      throw error;
    }
    const names = new Set<string>();
    for (const e of entries) {
      if (!e.startsWith('.')) names.add(decodeURIComponent(e));
      const aside = /^\.old-(.+)-\d+-\d+-\d+$/.exec(e);
      if (aside) names.add(decodeURIComponent(aside[1] as string));
    }
    return [...names];
  }

  async listAdapters(): Promise<AdapterEntry[]> {
    const entries: AdapterEntry[] = [];
    for (const name of await this.names('adapters')) {
      const entry = await this.getAdapter(name);
      if (entry) entries.push(entry);
    }
    return entries.sort((a, b) => b.created - a.created);
  }

  async getAdapter(name: string): Promise<AdapterEntry | undefined> {
    await this.recover('adapters', name);
    return this.readJson<AdapterEntry>(`${this.path('adapters', name)}/${ENTRY}`);
  }

  async readAdapterFiles(name: string): Promise<AdapterFiles | undefined> {
    if (!(await this.getAdapter(name))) return undefined;
    const f = await fs();
    const dir = this.path('adapters', name);
    return {
      config: await f.readFile(`${dir}/${CONFIG}`, 'utf8'),
      weights: new Uint8Array(await f.readFile(`${dir}/${WEIGHTS}`)),
    };
  }

  async putAdapter(entry: AdapterEntry, files: AdapterFiles, options: { overwrite?: boolean } = {}): Promise<void> {
    const name = checkName(entry.name, 'adapter name');
    if (!options.overwrite && (await this.getAdapter(name))) throw new AdapterExistsError(name);
    await this.replace(
      'adapters',
      name,
      { [CONFIG]: files.config, [WEIGHTS]: files.weights, [ENTRY]: JSON.stringify(entry, null, 2) },
      `adapter ${JSON.stringify(name)}`,
    );
  }

  async renameAdapter(from: string, to: string): Promise<AdapterEntry> {
    checkName(to, 'adapter name');
    const entry = await this.getAdapter(from);
    if (!entry) throw new AdapterNotFoundError(from);
    if (from === to) return entry;
    if (await this.getAdapter(to)) throw new AdapterExistsError(to);
    const renamed = { ...entry, name: to };
    const f = await fs();
    // Rewrite the entry in place (it names the adapter), then move the folder in one rename.
    const dir = this.path('adapters', from);
    await f.writeFile(`${dir}/${ENTRY}.tmp`, JSON.stringify(renamed, null, 2));
    await f.rename(`${dir}/${ENTRY}.tmp`, `${dir}/${ENTRY}`);
    await f.rename(dir, this.path('adapters', to));
    return renamed;
  }

  async deleteAdapter(name: string): Promise<void> {
    if (!(await this.getAdapter(name))) throw new AdapterNotFoundError(name);
    await (await fs()).rm(this.path('adapters', name), { recursive: true, force: true });
  }

  async listCheckpoints(): Promise<CheckpointMeta[]> {
    const metas: CheckpointMeta[] = [];
    for (const name of await this.names('checkpoints')) {
      await this.recover('checkpoints', name);
      const meta = await this.readJson<CheckpointMeta>(`${this.path('checkpoints', name)}/${META}`);
      if (meta) metas.push(meta);
    }
    return metas.sort((a, b) => b.updated - a.updated);
  }

  async readCheckpoint(name: string): Promise<CheckpointRecord | undefined> {
    await this.recover('checkpoints', name);
    const dir = this.path('checkpoints', name);
    const meta = await this.readJson<CheckpointMeta>(`${dir}/${META}`);
    if (!meta) return undefined;
    const file = await openSafetensors(directorySource(dir), STATE);
    const tensors: Record<string, Float32Array> = {};
    for (const key of file.names()) tensors[key] = await file.readTensor(key);
    return { meta, tensors };
  }

  async putCheckpoint(record: CheckpointRecord): Promise<void> {
    const name = checkName(record.meta.name, 'run name');
    const state = serializeSafetensors(
      Object.entries(record.tensors).map(([key, data]) => ({ name: key, dtype: 'F32', shape: [data.length], data })),
    );
    await this.replace(
      'checkpoints',
      name,
      { [META]: JSON.stringify(record.meta, null, 2), [STATE]: state },
      `the checkpoint of run ${JSON.stringify(name)}`,
    );
  }

  async deleteCheckpoint(name: string): Promise<void> {
    await (await fs()).rm(this.path('checkpoints', name), { recursive: true, force: true });
  }
}
