/**
 * Errors met while reading model files. Each names the file (and the tensor, when one is at
 * fault) so that the message alone tells a person which download is broken.
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
