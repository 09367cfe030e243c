/**
 * Errors met while reading model files, or running them. Each names the file (and the tensor,
 * when one is at fault), or the examples, so that the message alone tells a person what is broken.
 */
import { WebtuneError } from '@webtune/core';

/** A safetensors file (or a sharded model's index) that is malformed or uses what we cannot read. */
export class SafetensorsError extends WebtuneError {
  constructor(
    /** The file as the source names it: "model-00001-of-00002.safetensors". */
    readonly file: string,
    /** The tensor at fault, when the problem belongs to one. */
    readonly tensor: string | undefined,
    /** What is wrong, without the file and tensor (they are added to the message). */
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}${tensor === undefined ? '' : `, tensor "${tensor}"`}: ${reason}`, options);
  }
}

/** A file that a source does not have, or could not deliver (I/O error, HTTP status, short read). */
export class ModelFileError extends WebtuneError {
  constructor(
    /** The source's description: a folder path, a base URL, "dropped files (...)". */
    readonly source: string,
    readonly file: string,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`${file} in ${source}: ${reason}`, options);
  }
}

/** An evaluation whose loss came out NaN or infinite: the weights (usually an adapter from a run
 * that diverged, or a base that overflows at its precision) give non-finite logits. */
export class NonFiniteLossError extends WebtuneError {
  constructor(
    /** Indices, in the examples as given, of the batch whose loss was not finite. */
    readonly examples: readonly number[],
    /** Their length in tokens. */
    readonly tokens: number,
    /** The batch's summed cross-entropy as it came back (NaN or ±Infinity). */
    readonly loss: number,
  ) {
    const which =
      examples.length === 1
        ? `example ${examples[0]}`
        : `examples ${examples.slice(0, 8).join(', ')}${examples.length > 8 ? ', ...' : ''}`;
    super(
      `evaluate: the loss of ${which} (${tokens} tokens${examples.length === 1 ? '' : ' each'}) is ${loss}: the model's weights or the adapter ` +
        'give non-finite logits there (an adapter from a run that diverged, or a base that overflows at this precision)',
    );
  }
}
