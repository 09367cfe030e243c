/**
 * The one error class of the data pipeline. A bad line of a data file names the file and its
 * 1-based line number, so the message alone tells a person where to look.
 */
import { WebtuneError } from '@webtune/core';

export class DataError extends WebtuneError {
  constructor(
    /** The file name the caller gave ("train.jsonl"), or a description of the data. */
    readonly file: string,
    /** The 1-based line number, or undefined when the problem is not on one line. */
    readonly line: number | undefined,
    /** What is wrong, without the file and line (they are added to the message). */
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(line === undefined ? `${file}: ${reason}` : `${file}, line ${line}: ${reason}`, options);
  }
}
