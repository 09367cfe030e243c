import { formatBytes, WebtuneError } from '@webtune/core';

/** The browser (or the disk) refused to store more: nothing was half-written, the previous
 * adapter or checkpoint is intact. */
export class StorageQuotaError extends WebtuneError {
  constructor(
    /** What was being saved ("adapter x", "checkpoint of run y"). */
    readonly what: string,
    readonly bytes: number,
    options?: { cause?: unknown },
  ) {
    super(
      `not enough storage to save ${what} (${formatBytes(bytes)}): the browser's storage quota is full. ` +
        'Delete adapters or cached models you no longer need and try again; what was saved before is intact.',
      options,
    );
  }
}

export class AdapterNotFoundError extends WebtuneError {
  constructor(readonly adapter: string) {
    super(`no adapter named ${JSON.stringify(adapter)} in the library`);
  }
}

export class AdapterExistsError extends WebtuneError {
  constructor(readonly adapter: string) {
    super(`an adapter named ${JSON.stringify(adapter)} already exists; choose another name or delete it first`);
  }
}

export class CheckpointNotFoundError extends WebtuneError {
  constructor(readonly run: string) {
    super(`no checkpoint of a run named ${JSON.stringify(run)} (it finished, was cancelled, or never saved one)`);
  }
}

/** A name for an adapter or a run: visible text, not too long. */
export function checkName(name: unknown, what = 'name'): string {
  if (typeof name !== 'string' || name.trim() === '')
    throw new WebtuneError(`${what} must be a non-empty string, got ${JSON.stringify(name)}`);
  if (name.length > 200) throw new WebtuneError(`${what} is ${name.length} characters long; 200 at most`);
  // biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
  if (/[\u0000-\u001f\u007f]/.test(name))
    throw new WebtuneError(`${what} ${JSON.stringify(name)} contains control characters`);
  return name;
}

/** True for the DOMException a full IndexedDB or Cache API raises (and the disk-full errno under Node). */
export function isQuotaError(error: unknown): boolean {
  const name = (error as { name?: unknown } | null)?.name;
  const code = (error as { code?: unknown } | null)?.code;
  return name === 'QuotaExceededError' || code === 'ENOSPC' || code === 'EDQUOT';
}
