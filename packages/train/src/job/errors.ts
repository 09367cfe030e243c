import { WebtuneError } from '@webtune/core';

/** A training job that cannot be exported as asked: the adapter lacks what the job script needs,
 * the data does not fit the settings, or a setting has no TRL equivalent. Nothing is written. */
export class TrainingJobError extends WebtuneError {
  constructor(
    /** What is at fault: "adapter_config.json (target_modules)", "data.train[3]", "training.batch" ... */
    readonly item: string,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`training job: ${item}: ${reason}`, options);
  }
}
