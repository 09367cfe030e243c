/**
 * comlink rethrows a plain Error on the calling side; this handler sends webtune's typed errors
 * whole (serializeError / deserializeError), so `instanceof DataError` and `error.line` work the
 * same with and without a worker. Installed on both sides of the boundary.
 */
import { type TransferHandler, transferHandlers } from 'comlink';
import { deserializeError, type SerializedError, serializeError } from './errors.js';

let installed = false;

type Thrown = { value: unknown };
type Serialized = { isError: true; value: SerializedError } | { isError: false; value: unknown };

export function installErrorTransfer(): void {
  if (installed) return;
  installed = true;
  const original = transferHandlers.get('throw') as TransferHandler<Thrown, Serialized>;
  const handler: TransferHandler<Thrown, Serialized> = {
    canHandle: (value): value is Thrown => original.canHandle(value),
    serialize({ value }) {
      return [value instanceof Error ? { isError: true, value: serializeError(value) } : { isError: false, value }, []];
    },
    deserialize(serialized) {
      if (serialized.isError) throw deserializeError(serialized.value);
      throw serialized.value;
    },
  };
  transferHandlers.set('throw', handler as TransferHandler<unknown, unknown>);
}
