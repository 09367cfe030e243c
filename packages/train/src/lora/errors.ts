/**
 * Errors of the LoRA configuration and of PEFT adapter files. Each names what is at fault (the
 * config field, the module, the tensor, the file) and, where it helps, the values that would be
 * accepted, so that the message alone tells a person what to change.
 */
import { WebtuneError } from '@webtune/core';

/** A LoRA configuration value that is invalid, or valid in PEFT but not supported by webtune. */
export class LoraConfigError extends WebtuneError {
  constructor(
    /** The LoraConfig field at fault ("r", "target_modules", "rank_pattern", ...). */
    readonly field: string,
    /** What is wrong, including the value given and what is allowed. */
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`LoraConfig.${field}: ${reason}`, options);
  }
}

/**
 * target_modules selected no module of the model. The message starts with PEFT's own
 * ("Target modules {...} not found in the base model. ...") and adds the model's linear module
 * names, which PEFT does not list.
 */
export class NoMatchingTargetError extends LoraConfigError {
  constructor(
    /** PEFT's message for the same configuration. */
    readonly peftMessage: string,
    /** The last part of each linear (or GPT-2 Conv1D) module name, each once, in model order. */
    readonly linearModuleNames: readonly string[],
    /** One full module path, to show what a name looks like (undefined when there is none). */
    readonly exampleModule: string | undefined,
  ) {
    super(
      'target_modules',
      `${peftMessage} The model's linear modules are: ${linearModuleNames.join(', ') || '(none)'}` +
        (exampleModule === undefined ? '.' : ` (full paths look like "${exampleModule}").`),
    );
  }
}

/** An adapter folder whose adapter_config.json or adapter_model.safetensors is malformed, or uses
 * what webtune does not support. */
export class AdapterFormatError extends WebtuneError {
  constructor(
    /** "adapter_config.json" or "adapter_model.safetensors". */
    readonly file: string,
    /** The config field or tensor key at fault, when one is. */
    readonly item: string | undefined,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}${item === undefined ? '' : ` (${item})`}: ${reason}`, options);
  }
}

/** An adapter that does not fit the base model: a tensor for a module the model lacks, a shape
 * that does not fit the module, a module the config selects but the file has no tensor for. */
export class AdapterMismatchError extends WebtuneError {
  constructor(
    /** The module path in the base model ("model.layers.0.self_attn.q_proj"). */
    readonly module: string,
    readonly reason: string,
    /** The tensor key at fault, when one is. */
    readonly key?: string,
    /** The shape the model needs and the shape the file holds, for shape errors. */
    readonly expected?: readonly number[],
    readonly found?: readonly number[],
  ) {
    super(`adapter module "${module}"${key === undefined ? '' : `, tensor "${key}"`}: ${reason}`);
  }
}
