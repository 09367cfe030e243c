/**
 * One training run per GPU across the tabs of a site: runs hold a Web Lock for as long as they
 * keep GPU memory (running or paused). Where the Web Locks API is missing (Node 20), only this
 * engine's own runs are counted.
 */
import { TrainerBusyError } from './errors.js';

export const TRAINING_LOCK = 'webtune:training';

interface LockManagerLike {
  request<T>(name: string, options: { ifAvailable?: boolean }, callback: (lock: unknown) => Promise<T>): Promise<T>;
}

function lockManager(): LockManagerLike | undefined {
  return (globalThis as { navigator?: { locks?: LockManagerLike } }).navigator?.locks;
}

/**
 * Runs `fn` while holding the training lock. 'error': TrainerBusyError at once when another run
 * holds it; 'wait': queue behind it.
 */
export function withTrainingLock<T>(whenBusy: 'wait' | 'error', fn: () => Promise<T>): Promise<T> {
  const locks = lockManager();
  if (!locks) return fn();
  return locks.request(TRAINING_LOCK, whenBusy === 'error' ? { ifAvailable: true } : {}, async (lock) => {
    if (lock === null) throw new TrainerBusyError();
    return fn();
  });
}
