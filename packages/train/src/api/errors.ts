/**
 * The trainer API's own errors, and how every webtune error keeps its class across the worker
 * boundary: comlink would rethrow a plain Error on the calling side, so a thrown error is sent as
 * {name, message, fields} and rebuilt as an instance of the class with that name (instanceof
 * works, and `file`, `line`, `limit` ... are still there).
 */

import * as core from '@webtune/core';
import { WebtuneError } from '@webtune/core';
import * as models from '@webtune/models';
import * as data from '../data/index.js';
import * as lora from '../lora/index.js';
import * as memory from '../memory.js';
import * as checkpoint from '../run/checkpoint.js';
import * as config from '../run/config.js';
import * as store from '../store/errors.js';
import * as trainer from '../trainer.js';

/** A call that needs a loaded model (or dataset) before it. */
export class NotLoadedError extends WebtuneError {
  constructor(
    readonly missing: 'model' | 'dataset',
    readonly call: string,
  ) {
    super(
      missing === 'model'
        ? `${call}: no model is loaded; call loadModel() first`
        : `${call}: no dataset is loaded; call loadDataset() first`,
    );
  }
}

/** Another run holds the GPU (in this tab or another one of the same site). */
export class TrainerBusyError extends WebtuneError {
  constructor(readonly holder?: string) {
    super(
      `another training run is using the GPU${holder ? ` (${holder})` : ''}; wait for it to finish, pause or cancel it, or train with { whenBusy: 'wait' }`,
    );
  }
}

/** resumeTraining() or `from` with a base model or data that differ from the run's. */
export class RunMismatchError extends WebtuneError {
  constructor(
    readonly run: string,
    readonly what: 'model' | 'dataset',
    readonly reason: string,
  ) {
    super(`run ${JSON.stringify(run)} cannot continue on the loaded ${what}: ${reason}`);
  }
}

/** An adapter used with a base model other than the one it was trained on. */
export class BaseModelMismatchError extends WebtuneError {
  constructor(
    readonly adapter: string,
    readonly trainedOn: string | null,
    readonly loaded: string,
  ) {
    super(
      `adapter ${JSON.stringify(adapter)} was trained on ${trainedOn ?? 'another model'}, not on the loaded model ${loaded} (their weights differ); load ${trainedOn ?? 'that model'} to use it`,
    );
  }
}

/** An unknown run name for pause/resume/cancel. */
export class NoSuchRunError extends WebtuneError {
  constructor(readonly run: string) {
    super(`no training run named ${JSON.stringify(run)} is active`);
  }
}

type ErrorClass = new (...args: never[]) => Error;

/** Every exported error class, by name. */
const classes = new Map<string, ErrorClass>();
for (const module of [core, models, data, lora, memory, checkpoint, config, store, trainer]) {
  for (const value of Object.values(module)) {
    if (typeof value === 'function' && value.prototype instanceof Error) classes.set(value.name, value as ErrorClass);
  }
}
for (const c of [
  WebtuneError,
  NotLoadedError,
  TrainerBusyError,
  RunMismatchError,
  NoSuchRunError,
  BaseModelMismatchError,
])
  classes.set(c.name, c as ErrorClass);

export interface SerializedError {
  readonly name: string;
  readonly message: string;
  readonly stack?: string;
  /** The error's own fields that survive structured cloning. */
  readonly fields: Record<string, unknown>;
}

function cloneable(value: unknown): boolean {
  if (value === null || ['string', 'number', 'boolean', 'undefined'].includes(typeof value)) return true;
  if (Array.isArray(value)) return value.every(cloneable);
  if (typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype)
    return Object.values(value as object).every(cloneable);
  return false;
}

export function serializeError(error: unknown): SerializedError {
  if (!(error instanceof Error)) return { name: 'Error', message: String(error), fields: {} };
  const fields: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(error)) if (key !== 'cause' && cloneable(value)) fields[key] = value;
  // DOMException keeps its name (AbortError, QuotaExceededError) on the prototype.
  return { name: error.name, message: error.message, ...(error.stack ? { stack: error.stack } : {}), fields };
}

export function deserializeError(e: SerializedError): Error {
  const Class = classes.get(e.name);
  let error: Error;
  if (Class) error = Object.create(Class.prototype) as Error;
  else if (e.name === 'AbortError' && typeof DOMException !== 'undefined')
    return new DOMException(e.message, 'AbortError');
  else error = new Error(e.message);
  Object.assign(error, e.fields);
  Object.defineProperty(error, 'message', { value: e.message, writable: true, configurable: true });
  Object.defineProperty(error, 'name', { value: e.name, writable: true, configurable: true });
  if (e.stack) Object.defineProperty(error, 'stack', { value: e.stack, writable: true, configurable: true });
  return error;
}
