/**
 * JSON Lines training data: one JSON object per line, in one of four formats.
 *
 *   {"text": "..."}                                    plain text, trained on every token
 *   {"prompt": "...", "completion": "..."}             trained on the completion only
 *   {"messages": [{"role": "...", "content": "..."}]}  a conversation, trained on the assistant turns
 *   {"instruction": "...", "input": "...", "output": "..."}
 *                                                      Alpaca: the instruction (and optional input)
 *                                                      in Alpaca's prompt template, trained on the output
 *
 * Blank (empty or whitespace-only) lines are skipped; every other line must be one valid record.
 * A line that is not JSON, is not an object, has none of the formats' keys, mixes formats, or
 * has an empty text is a DataError naming the file and the 1-based line number. Keys that belong
 * to no format ("id", "source", ...) are metadata and are ignored, so the usual dataset exports
 * load as they are; a misspelt format key ("txt") leaves the line with no format and is reported.
 *
 * Parsing is separate from tokenization (examples.ts), so a file can be checked before a
 * tokenizer is loaded and all its bad lines reported at once (readJsonl).
 */
import type { ChatMessage } from '@webtune/models';
import { DataError } from './errors.js';

export type DataFormat = 'text' | 'prompt-completion' | 'messages' | 'alpaca';

export interface TextRecord {
  format: 'text';
  /** 1-based line number in the file. */
  line: number;
  text: string;
}

export interface PromptCompletionRecord {
  format: 'prompt-completion';
  line: number;
  /** May be empty (an unconditional completion). */
  prompt: string;
  completion: string;
}

export interface MessagesRecord {
  format: 'messages';
  line: number;
  /** At least one message, at least one of them with role "assistant". */
  messages: ChatMessage[];
}

export interface AlpacaRecord {
  format: 'alpaca';
  line: number;
  instruction: string;
  /** Optional context ("" when absent). */
  input: string;
  output: string;
}

export type DataRecord = TextRecord | PromptCompletionRecord | MessagesRecord | AlpacaRecord;

/**
 * How an Alpaca record becomes a prompt; the output is the completion (loss on it only, as for
 * {"prompt","completion"}). The text is Stanford Alpaca's (github.com/tatsu-lab/stanford_alpaca,
 * train.py PROMPT_DICT) with a line break after "### Response:" (as alpaca-lora's template has
 * it), so that the output starts on a line of its own whatever the tokenizer. The first template
 * is used when "input" is a non-empty string, the second when it is "" or absent, as Stanford's
 * `example.get("input", "") != ""` decides. Anything else that trains on the same data (the
 * cluster job's TRL script) must apply the same mapping; in Python:
 *
 *   template = ALPACA_PROMPT_WITH_INPUT if record.get("input", "") != "" else ALPACA_PROMPT_NO_INPUT
 *   prompt = template.format_map({"instruction": record["instruction"], "input": record.get("input", "")})
 *   completion = record["output"]
 */
export const ALPACA_PROMPT_WITH_INPUT =
  'Below is an instruction that describes a task, paired with an input that provides further context. ' +
  'Write a response that appropriately completes the request.\n\n' +
  '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n';
export const ALPACA_PROMPT_NO_INPUT =
  'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' +
  '### Instruction:\n{instruction}\n\n### Response:\n';

/** An Alpaca record as the prompt and completion it is trained as. */
export function alpacaPrompt(record: { instruction: string; input?: string; output: string }): {
  prompt: string;
  completion: string;
} {
  const input = record.input ?? '';
  const template = input === '' ? ALPACA_PROMPT_NO_INPUT : ALPACA_PROMPT_WITH_INPUT;
  // One pass over the template, as Python's format_map: a "{input}" or "$&" in the user's text stays literal.
  const prompt = template.replace(/\{(instruction|input)\}/g, (_, key: string) =>
    key === 'input' ? input : record.instruction,
  );
  return { prompt, completion: record.output };
}

/** The keys that select each format; a line's format is the one whose keys it has. */
const FORMAT_KEYS: Record<DataFormat, readonly string[]> = {
  text: ['text'],
  'prompt-completion': ['prompt', 'completion'],
  messages: ['messages'],
  alpaca: ['instruction', 'output'],
};

const FORMATS_HINT = 'expected {"text"}, {"prompt", "completion"}, {"messages"} or {"instruction", "input", "output"}';

export interface JsonlReading {
  /** The valid records, in file order. */
  records: DataRecord[];
  /** One error per bad line, in file order (empty when the file is valid). */
  errors: DataError[];
  /** Blank lines skipped. */
  blankLines: number;
}

/**
 * Reads every line of a JSONL file and reports every bad line (for a UI that lists them all).
 * `file` names the data in messages. A UTF-8 byte-order mark at the start is ignored, and lines
 * may end in "\n" or "\r\n".
 */
export function readJsonl(text: string, file: string): JsonlReading {
  const records: DataRecord[] = [];
  const errors: DataError[] = [];
  let blankLines = 0;
  const lines = (text.startsWith('\uFEFF') ? text.slice(1) : text).split('\n');
  // A final "\n" ends the last line; it does not start a blank one.
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!;
    if (raw.trim() === '') {
      blankLines++;
      continue;
    }
    const result = parseLine(raw, file, i + 1);
    if (result instanceof DataError) errors.push(result);
    else records.push(result);
  }
  if (records.length === 0 && errors.length === 0) {
    errors.push(new DataError(file, undefined, 'has no records (the file is empty or only blank lines)'));
  }
  return { records, errors, blankLines };
}

/** The records of a JSONL file; throws the first bad line's DataError. */
export function parseJsonl(text: string, file: string): DataRecord[] {
  const { records, errors } = readJsonl(text, file);
  if (errors.length > 0) throw errors[0];
  return records;
}

/** One line as a record, or the DataError that says why it is not one. */
export function parseLine(raw: string, file: string, line: number): DataRecord | DataError {
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch (error) {
    const reason = `not valid JSON (${error instanceof Error ? error.message : String(error)})`;
    return new DataError(file, line, reason, { cause: error });
  }
  return parseRecord(value, file, line);
}

/**
 * A parsed JSON value as a record (a JSONL line, an element of a JSON array), or the DataError
 * that says why it is not one; `line` is where it starts.
 */
export function parseRecord(value: unknown, file: string, line: number): DataRecord | DataError {
  const fail = (reason: string) => new DataError(file, line, reason);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return fail(`expected a JSON object, got ${describe(value)}`);
  }
  const obj = value as Record<string, unknown>;
  const present = (Object.keys(FORMAT_KEYS) as DataFormat[]).filter((format) =>
    FORMAT_KEYS[format].some((key) => Object.hasOwn(obj, key)),
  );
  if (present.length === 0) {
    const keys = Object.keys(obj);
    return fail(
      `has none of the formats: ${FORMATS_HINT}; found ${keys.length === 0 ? 'no keys' : `keys ${keys.map((k) => JSON.stringify(k)).join(', ')}`}`,
    );
  }
  if (present.length > 1) {
    const keys = present.flatMap((format) => FORMAT_KEYS[format].filter((key) => Object.hasOwn(obj, key)));
    return fail(`mixes formats (${keys.map((k) => JSON.stringify(k)).join(', ')}): ${FORMATS_HINT}, one per line`);
  }
  const format = present[0]!;
  if (format === 'text') {
    const text = obj.text;
    if (typeof text !== 'string') return fail(`"text" must be a string, got ${describe(text)}`);
    if (text.trim() === '') return fail(`"text" is empty${text === '' ? '' : ' (only whitespace)'}`);
    return { format, line, text };
  }
  if (format === 'prompt-completion') {
    if (!Object.hasOwn(obj, 'prompt')) return fail('has "completion" but no "prompt"');
    if (!Object.hasOwn(obj, 'completion')) return fail('has "prompt" but no "completion"');
    const { prompt, completion } = obj;
    if (typeof prompt !== 'string') return fail(`"prompt" must be a string, got ${describe(prompt)}`);
    if (typeof completion !== 'string') return fail(`"completion" must be a string, got ${describe(completion)}`);
    if (completion.trim() === '') return fail(`"completion" is empty${completion === '' ? '' : ' (only whitespace)'}`);
    return { format, line, prompt, completion };
  }
  if (format === 'alpaca') {
    if (!Object.hasOwn(obj, 'instruction')) return fail('has "output" but no "instruction"');
    if (!Object.hasOwn(obj, 'output')) return fail('has "instruction" but no "output"');
    const { instruction, output } = obj;
    const input = obj.input ?? '';
    if (typeof instruction !== 'string') return fail(`"instruction" must be a string, got ${describe(instruction)}`);
    if (typeof input !== 'string') return fail(`"input" must be a string, got ${describe(input)}`);
    if (typeof output !== 'string') return fail(`"output" must be a string, got ${describe(output)}`);
    if (output.trim() === '') return fail(`"output" is empty${output === '' ? '' : ' (only whitespace)'}`);
    return { format, line, instruction, input, output };
  }
  const messages = obj.messages;
  if (!Array.isArray(messages)) return fail(`"messages" must be a list of {role, content}, got ${describe(messages)}`);
  if (messages.length === 0) return fail('"messages" is empty');
  let assistants = 0;
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i] as unknown;
    if (typeof m !== 'object' || m === null || Array.isArray(m)) {
      return fail(`messages[${i}] must be an object {role, content}, got ${describe(m)}`);
    }
    const { role, content } = m as Record<string, unknown>;
    if (typeof role !== 'string' || role === '') {
      return fail(`messages[${i}].role must be a non-empty string, got ${describe(role)}`);
    }
    if (typeof content !== 'string') {
      return fail(`messages[${i}].content must be a string, got ${describe(content)}`);
    }
    if (role === 'assistant') assistants++;
  }
  if (assistants === 0) return fail('"messages" has no message with role "assistant" (nothing to train on)');
  return { format, line, messages: messages as ChatMessage[] };
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'string') return value === '' ? 'an empty string' : 'a string';
  if (typeof value === 'object') return 'an object';
  if (value === undefined) return 'nothing';
  return `a ${typeof value} (${String(value)})`;
}
