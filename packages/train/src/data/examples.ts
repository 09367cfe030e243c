/**
 * Tokenized training examples: input ids and labels, with -100 (IGNORE_INDEX) where no loss is
 * taken.
 *
 * Labels follow transformers' causal-LM convention `labels = input_ids` (masked): the model shifts
 * them itself, so the label at position t is predicted from position t - 1 and the label at
 * position 0 is never used. "Predicted positions" (the loss's token count, transformers'
 * num_items_in_batch) are therefore the positions t >= 1 whose label is not -100.
 *
 * How each kind of data becomes ids:
 * - plain text (textWindows): the whole text tokenized once with the tokenizer's default special
 *   tokens (BOS for Llama-family tokenizers, none for GPT-2) and cut into consecutive windows of
 *   `seq` tokens; a last window of at least 2 tokens is kept, a shorter one dropped. Labels =
 *   ids. This is exactly `webtune eval`'s windowing (tools/golden_forward.py's eval record).
 * - {"text"}: tokenized with the default special tokens, then EOS appended when the tokenizer has
 *   one and did not already end the ids with it. Labels = ids.
 * - {"instruction","input","output"} (Alpaca): as {"prompt","completion"} with the prompt written by
 *   Alpaca's template (jsonl.ts alpacaPrompt) and the output as the completion.
 * - {"prompt","completion"}: the prompt with the default special tokens, then the completion
 *   tokenized on its own without special tokens, then EOS. Labels -100 on the prompt's tokens.
 *   (The two are tokenized separately, so a SentencePiece tokenizer spells the completion's first
 *   word as a word start, as if a space preceded it.)
 * - {"messages"}: rendered with the tokenizer's chat template and tokenized without adding special
 *   tokens (the template writes them). Loss only on what each assistant message contributes:
 *   render(messages[0..i]) minus render(messages[0..i-1], add_generation_prompt = true), compared
 *   as token ids. The template must render earlier turns the same once later turns follow (the
 *   prefix property); where it does not (Qwen3's template drops the <think> block of earlier
 *   assistant turns) the record is a DataError that says so, and assistantLoss 'last' or 'split'
 *   trains such data (see ChatOptions).
 *
 * Examples longer than `seq` tokens are truncated to their first `seq` tokens (the beginning of a
 * document, the prompt and the start of the answer are kept; the end is lost, including its EOS).
 * This is transformers' default truncation side and what TRL's SFTTrainer does with max_length.
 * Truncations are counted in the statistics. An example left with no predicted position (a
 * prompt that fills the whole sequence) is dropped and counted, because a batch made only of such
 * rows would have no token to average the loss over.
 */
import type { ChatMessage, Tokenizer } from '@webtune/models';
import { DataError } from './errors.js';
import { alpacaPrompt, type DataFormat, type DataRecord, type MessagesRecord } from './jsonl.js';

/** The label of a position that takes no loss (PyTorch's cross_entropy ignore_index). */
export const IGNORE_INDEX = -100;

export interface Example {
  /** Token ids, at most `seq` of them. */
  inputIds: Int32Array;
  /** Same length as inputIds: the id to predict at each position, or IGNORE_INDEX. */
  labels: Int32Array;
  /** 'text-window' for a window of plain text; otherwise the JSONL record's format. */
  format: DataFormat | 'text-window';
  /** JSONL: the record's 1-based line number. */
  line?: number;
  /** Plain text: the window's index. */
  window?: number;
  /** assistantLoss 'split': the index in `messages` of the assistant message this example trains. */
  turn?: number;
  /** The length before truncation, when the example was truncated. */
  fullLength?: number;
}

/** The number of positions whose label counts in the loss: t >= 1 with labels[t] != IGNORE_INDEX. */
export function predictedPositions(labels: ArrayLike<number>): number {
  let n = 0;
  for (let t = 1; t < labels.length; t++) if (labels[t] !== IGNORE_INDEX) n++;
  return n;
}

function checkSeq(seq: number): void {
  if (!Number.isSafeInteger(seq) || seq < 2) {
    throw new RangeError(`the sequence length must be an integer >= 2, got ${seq}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Plain text

export interface TextWindows {
  /** One example per window, labels = input ids. */
  examples: Example[];
  /** Tokens of the whole text (with the default special tokens). */
  textTokens: number;
  /** Windows kept. */
  windows: number;
  /** Predicted positions over all windows: the sum of (window length - 1). */
  tokens: number;
  /** Tokens of a last window shorter than 2 that was dropped (0 or 1). */
  droppedTokens: number;
}

/**
 * Cuts ids into consecutive windows of `seq` (a last window of >= 2 ids kept, a shorter one
 * dropped). Returns [start, end) pairs.
 */
export function windowBounds(length: number, seq: number): [number, number][] {
  checkSeq(seq);
  const bounds: [number, number][] = [];
  for (let start = 0; start < length; start += seq) {
    const end = Math.min(start + seq, length);
    if (end - start >= 2) bounds.push([start, end]);
  }
  return bounds;
}

/** Plain text as `webtune eval` and `webtune train --format text` read it (see the module header). */
export function textWindows(tokenizer: Tokenizer, text: string, seq: number): TextWindows {
  checkSeq(seq);
  const ids = tokenizer.encode(text);
  const examples: Example[] = windowBounds(ids.length, seq).map(([start, end], window) => {
    const inputIds = Int32Array.from(ids.slice(start, end));
    return { inputIds, labels: inputIds.slice(), format: 'text-window', window };
  });
  const kept = examples.reduce((sum, e) => sum + e.inputIds.length, 0);
  return {
    examples,
    textTokens: ids.length,
    windows: examples.length,
    tokens: kept - examples.length,
    droppedTokens: ids.length - kept,
  };
}

// ---------------------------------------------------------------------------------------------
// JSONL records

export interface ChatOptions {
  /**
   * Which assistant messages of a conversation take loss:
   * - 'all' (default): every assistant message, in one example of the whole conversation. Needs
   *   the template's prefix property (earlier turns render the same whatever follows).
   * - 'last': only the last assistant message; the example is the conversation up to and
   *   including it. Needs only that the prompt before it renders as a prefix of it.
   * - 'split': one example per assistant message, each the conversation up to and including it
   *   (how the model sees that turn at inference time, whatever the template does to earlier
   *   turns); tokens grow quadratically with the number of turns.
   */
  assistantLoss?: 'all' | 'last' | 'split';
  /** Extra template variables (Qwen3: { enable_thinking: false }). */
  templateArgs?: Record<string, unknown>;
  /** A Jinja template, or the name of one of the tokenizer's templates, instead of the default. */
  template?: string;
}

export interface TokenizeOptions {
  /** Longest example in tokens; longer ones are truncated (module header). */
  seq: number;
  /** Names the data in errors. */
  file: string;
  chat?: ChatOptions;
}

export interface TokenizedRecords {
  examples: Example[];
  /** JSONL line numbers of the records dropped because no predicted position was left after truncation. */
  droppedLines: number[];
}

/** Tokenizes parsed JSONL records (see the module header for each format's rule). */
export function tokenizeRecords(
  tokenizer: Tokenizer,
  records: readonly DataRecord[],
  options: TokenizeOptions,
): TokenizedRecords {
  checkSeq(options.seq);
  const examples: Example[] = [];
  const droppedLines = new Set<number>();
  const eos = tokenizer.eosTokenIds[0];
  for (const record of records) {
    for (const full of tokenizeRecord(tokenizer, record, eos, options)) {
      const example = truncate(full, options.seq);
      if (predictedPositions(example.labels) === 0) droppedLines.add(record.line);
      else examples.push(example);
    }
  }
  return { examples, droppedLines: [...droppedLines] };
}

function truncate(example: Example, seq: number): Example {
  const n = example.inputIds.length;
  if (n <= seq) return example;
  return { ...example, inputIds: example.inputIds.slice(0, seq), labels: example.labels.slice(0, seq), fullLength: n };
}

function withEos(ids: number[], eos: number | undefined): number[] {
  if (eos !== undefined && ids[ids.length - 1] !== eos) ids.push(eos);
  return ids;
}

/** The prompt with the default special tokens, then the completion without them and EOS; loss on the completion. */
function promptCompletion(
  tokenizer: Tokenizer,
  promptText: string,
  completionText: string,
  eos: number | undefined,
  format: 'prompt-completion' | 'alpaca',
  line: number,
): Example {
  const prompt = tokenizer.encode(promptText);
  const completion = withEos(tokenizer.encode(completionText, { addSpecialTokens: false }), eos);
  const inputIds = Int32Array.from([...prompt, ...completion]);
  const labels = inputIds.slice();
  labels.fill(IGNORE_INDEX, 0, prompt.length);
  return { inputIds, labels, format, line };
}

function tokenizeRecord(
  tokenizer: Tokenizer,
  record: DataRecord,
  eos: number | undefined,
  options: TokenizeOptions,
): Example[] {
  const line = record.line;
  switch (record.format) {
    case 'text': {
      const inputIds = Int32Array.from(withEos(tokenizer.encode(record.text), eos));
      return [{ inputIds, labels: inputIds.slice(), format: 'text', line }];
    }
    case 'prompt-completion':
      return [promptCompletion(tokenizer, record.prompt, record.completion, eos, 'prompt-completion', line)];
    case 'alpaca': {
      const { prompt, completion } = alpacaPrompt(record);
      return [promptCompletion(tokenizer, prompt, completion, eos, 'alpaca', line)];
    }
    case 'messages':
      return chatExamples(tokenizer, record, options.file, options.chat ?? {});
  }
}

// ---------------------------------------------------------------------------------------------
// Conversations

interface Rendered {
  text: string;
  ids: number[];
}

function isPrefix<T>(prefix: ArrayLike<T>, of: ArrayLike<T>): boolean {
  if (prefix.length > of.length) return false;
  for (let i = 0; i < prefix.length; i++) if (prefix[i] !== of[i]) return false;
  return true;
}

/**
 * The examples of one conversation. Every assistant message's span is [start, end) in token ids:
 * start = length of render(messages before it, with the generation prompt), end = length of
 * render(messages up to and including it); both renderings must be token prefixes of the
 * example's rendering.
 */
function chatExamples(tokenizer: Tokenizer, record: MessagesRecord, file: string, chat: ChatOptions): Example[] {
  const { messages, line } = record;
  const fail = (reason: string, cause?: unknown) =>
    new DataError(file, line, reason, cause === undefined ? undefined : { cause });
  const render = (count: number, addGenerationPrompt: boolean): Rendered => {
    try {
      return tokenizer.applyChatTemplate(messages.slice(0, count), {
        addGenerationPrompt,
        ...(chat.templateArgs === undefined ? {} : { templateArgs: chat.templateArgs }),
        ...(chat.template === undefined ? {} : { template: chat.template }),
      });
    } catch (error) {
      throw fail(`the chat template failed: ${error instanceof Error ? error.message : String(error)}`, error);
    }
  };
  const assistants: number[] = [];
  messages.forEach((m: ChatMessage, i) => {
    if (m.role === 'assistant') assistants.push(i);
  });

  /** [start, end) of message i within `whole`, or a DataError saying which prefix property fails. */
  const span = (i: number, whole: Rendered, wholeCount: number): [number, number] => {
    const before = render(i, true);
    const through = i + 1 === wholeCount ? whole : render(i + 1, false);
    if (!isPrefix(before.ids, through.ids)) {
      throw fail(
        isPrefix(before.text, through.text)
          ? `messages[${i}] (assistant): its first tokens merge with the generation prompt's last ones, so the assistant's tokens cannot be separated from the prompt`
          : `messages[${i}] (assistant): the chat template's generation prompt is not how it begins an assistant message (render(messages[0..${i - 1}], add_generation_prompt) is not a prefix of render(messages[0..${i}]))`,
      );
    }
    if (!isPrefix(through.ids, whole.ids)) {
      throw fail(
        isPrefix(through.text, whole.text)
          ? `messages[${i}] (assistant): its last tokens merge with the next message's, so its tokens cannot be located`
          : `messages[${i}] (assistant): the chat template renders this message differently once later messages follow (Qwen3's template, for one, drops the <think> block of earlier assistant turns), so its tokens cannot be located; train on such conversations with assistantLoss 'last' or 'split'`,
      );
    }
    return [before.ids.length, through.ids.length];
  };
  const example = (whole: Rendered, spans: [number, number][], turn?: number): Example => {
    const inputIds = Int32Array.from(whole.ids);
    const labels = new Int32Array(inputIds.length).fill(IGNORE_INDEX);
    for (const [start, end] of spans) labels.set(inputIds.subarray(start, end), start);
    return { inputIds, labels, format: 'messages', line, ...(turn === undefined ? {} : { turn }) };
  };

  const mode = chat.assistantLoss ?? 'all';
  if (assistants.length === 0)
    throw fail('the conversation has no message with role "assistant" (nothing to train on)');
  if (mode === 'all') {
    const whole = render(messages.length, false);
    return [
      example(
        whole,
        assistants.map((i) => span(i, whole, messages.length)),
      ),
    ];
  }
  if (mode === 'last') {
    const last = assistants[assistants.length - 1]!;
    const whole = render(last + 1, false);
    return [example(whole, [span(last, whole, last + 1)])];
  }
  if (mode !== 'split')
    throw new RangeError(`assistantLoss must be 'all', 'last' or 'split', got ${JSON.stringify(mode)}`);
  return assistants.map((i) => {
    const whole = render(i + 1, false);
    return example(whole, [span(i, whole, i + 1)], i);
  });
}
