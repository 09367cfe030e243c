/**
 * The trainer's storage in IndexedDB, through idb-keyval: one database with one object store,
 * keys by prefix so that every multi-record change runs in one transaction (all or nothing):
 *
 *   adapter/<name>     AdapterEntry           (list() reads only these)
 *   files/<name>       AdapterFiles           (the PEFT files, read when used or exported)
 *   run/<name>         CheckpointMeta         (listCheckpoints() reads only these)
 *   checkpoint/<name>  the checkpoint's tensors (meta and tensors are replaced in one transaction)
 *
 * A QuotaExceededError aborts the transaction, so the previous records stay as they were; it is
 * reported as StorageQuotaError.
 */
import { createStore, promisifyRequest, type UseStore } from 'idb-keyval';
import { AdapterExistsError, AdapterNotFoundError, checkName, isQuotaError, StorageQuotaError } from './errors.js';
import type { AdapterEntry, AdapterFiles, CheckpointMeta, CheckpointRecord, TrainerStorage } from './types.js';

const ADAPTER = 'adapter/';
const FILES = 'files/';
const RUN = 'run/';
const CHECKPOINT = 'checkpoint/';

/** All values whose key starts with `prefix`. */
function withPrefix<T>(store: IDBObjectStore, prefix: string): Promise<T[]> {
  return promisifyRequest(store.getAll(IDBKeyRange.bound(prefix, `${prefix}\uffff`))) as Promise<T[]>;
}

function checkpointBytes(record: CheckpointRecord): number {
  return Object.values(record.tensors).reduce((n, t) => n + t.byteLength, 0);
}

export class IndexedDbStorage implements TrainerStorage {
  readonly description: string;
  private readonly store: UseStore;

  constructor(readonly database = 'webtune') {
    if (typeof indexedDB === 'undefined') throw new Error('IndexedDB is not available in this environment');
    this.description = `IndexedDB "${database}"`;
    this.store = createStore(database, 'library');
  }

  /** Runs `ops` in one readwrite transaction; a full quota becomes StorageQuotaError. */
  private async write(what: string, bytes: number, ops: (store: IDBObjectStore) => void): Promise<void> {
    try {
      await this.store('readwrite', (store) => {
        ops(store);
        return promisifyRequest(store.transaction);
      });
    } catch (error) {
      if (isQuotaError(error)) throw new StorageQuotaError(what, bytes, { cause: error });
      throw error;
    }
  }

  async listAdapters(): Promise<AdapterEntry[]> {
    const entries = await this.store('readonly', (s) => withPrefix<AdapterEntry>(s, ADAPTER));
    return entries.sort((a, b) => b.created - a.created);
  }

  getAdapter(name: string): Promise<AdapterEntry | undefined> {
    return this.store('readonly', (s) => promisifyRequest(s.get(ADAPTER + name)));
  }

  readAdapterFiles(name: string): Promise<AdapterFiles | undefined> {
    return this.store('readonly', (s) => promisifyRequest(s.get(FILES + name)));
  }

  async putAdapter(entry: AdapterEntry, files: AdapterFiles, options: { overwrite?: boolean } = {}): Promise<void> {
    const name = checkName(entry.name, 'adapter name');
    if (!options.overwrite && (await this.getAdapter(name))) throw new AdapterExistsError(name);
    await this.write(`adapter ${JSON.stringify(name)}`, files.weights.byteLength, (s) => {
      s.put(files, FILES + name);
      s.put(entry, ADAPTER + name);
    });
  }

  async renameAdapter(from: string, to: string): Promise<AdapterEntry> {
    checkName(to, 'adapter name');
    let renamed: AdapterEntry | undefined;
    let failure: Error | undefined;
    // Read, check and move inside one transaction, so a concurrent change cannot slip between.
    await this.write(`adapter ${JSON.stringify(to)}`, 0, (s) => {
      const entry = s.get(ADAPTER + from);
      const taken = s.get(ADAPTER + to);
      const files = s.get(FILES + from);
      files.onsuccess = () => {
        if (entry.result === undefined) {
          failure = new AdapterNotFoundError(from);
          return;
        }
        if (from !== to && taken.result !== undefined) {
          failure = new AdapterExistsError(to);
          return;
        }
        if (from === to) {
          renamed = entry.result;
          return;
        }
        renamed = { ...(entry.result as AdapterEntry), name: to };
        s.put(files.result, FILES + to);
        s.put(renamed, ADAPTER + to);
        s.delete(ADAPTER + from);
        s.delete(FILES + from);
      };
    });
    if (failure) throw failure;
    return renamed as AdapterEntry;
  }

  async deleteAdapter(name: string): Promise<void> {
    if (!(await this.getAdapter(name))) throw new AdapterNotFoundError(name);
    await this.write(`the deletion of ${JSON.stringify(name)}`, 0, (s) => {
      s.delete(ADAPTER + name);
      s.delete(FILES + name);
    });
  }

  async listCheckpoints(): Promise<CheckpointMeta[]> {
    const metas = await this.store('readonly', (s) => withPrefix<CheckpointMeta>(s, RUN));
    return metas.sort((a, b) => b.updated - a.updated);
  }

  async readCheckpoint(name: string): Promise<CheckpointRecord | undefined> {
    const [meta, tensors] = await this.store('readonly', (s) =>
      Promise.all([promisifyRequest(s.get(RUN + name)), promisifyRequest(s.get(CHECKPOINT + name))]),
    );
    if (meta === undefined || tensors === undefined) return undefined;
    return { meta, tensors };
  }

  async putCheckpoint(record: CheckpointRecord): Promise<void> {
    const name = checkName(record.meta.name, 'run name');
    await this.write(`the checkpoint of run ${JSON.stringify(name)}`, checkpointBytes(record), (s) => {
      s.put(record.tensors, CHECKPOINT + name);
      s.put(record.meta, RUN + name);
    });
  }

  async deleteCheckpoint(name: string): Promise<void> {
    await this.write(`the deletion of checkpoint ${JSON.stringify(name)}`, 0, (s) => {
      s.delete(RUN + name);
      s.delete(CHECKPOINT + name);
    });
  }
}
