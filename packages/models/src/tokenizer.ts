/**
 * Tokenizers: Hugging Face tokenizer.json (+ tokenizer_config.json, generation_config.json,
 * chat_template.jinja) read through a ModelSource, run by @huggingface/tokenizers (the tokenizer
 * pipeline) and rendered by @huggingface/jinja (chat templates): the two small, dependency-free
 * pieces transformers.js itself is built from, without its ONNX runtime. Nothing is fetched except
 * through the caller's source, and both are imported lazily, on the first load, so a page that
 * never tokenizes does not pay for them.
 *
 * Rules follow Python transformers 5 loading a tokenizer.json with PreTrainedTokenizerFast (the
 * oracle of test/golden/tokenizers, written by tools/golden_tokenizers.py):
 * - tokenizer.json is applied as written: its post-processor alone decides which special tokens
 *   encode() adds (transformers 5 drops add_bos_token / add_eos_token from tokenizer_config.json
 *   when a tokenizer.json exists). The class named by tokenizer_class is not used to rebuild the
 *   pipeline.
 * - clean_up_tokenization_spaces defaults to false and is ignored for BPE models (transformers 5
 *   does the same: the clean-up was written for WordPiece and corrupts BPE text).
 * - A separate chat_template.jinja takes priority over tokenizer_config.json's chat_template.
 *
 * Loaders: loadTokenizer(source) for any ModelSource; loadTokenizerFromDirectory(path) (Node),
 * loadTokenizerFromUrl(baseUrl) and loadTokenizerFromHub(repoId) build the matching source. The
 * Hub loader reads `<endpoint>/<repo>/resolve/<revision>/` through urlSource, so there is no global
 * configuration and no cache of its own (the caller's source decides both).
 */
import { WebtuneError } from '@webtune/core';
import { directorySource, type FetchLike, type ModelSource, urlSource } from './source.js';

type TokenizersModule = typeof import('@huggingface/tokenizers');
type JinjaModule = typeof import('@huggingface/jinja');
type HfTokenizer = InstanceType<TokenizersModule['Tokenizer']>;
type Template = InstanceType<JinjaModule['Template']>;

// ---------------------------------------------------------------------------------------------
// Public types

/** A tokenizer folder that is missing, unreadable or malformed, or a request it cannot serve. */
export class TokenizerError extends WebtuneError {
  constructor(
    /** The source's description: a folder path, a base URL, "dropped files". */
    readonly source: string,
    /** The file at fault ("tokenizer.json"), or undefined when no one file is. */
    readonly file: string | undefined,
    /** What is wrong, without the source and file (they are added to the message). */
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(file === undefined ? `tokenizer from ${source}: ${reason}` : `${file} in ${source}: ${reason}`, options);
  }
}

export interface EncodeOptions {
  /** Add the special tokens of tokenizer.json's post-processor (BOS for Llama, none for GPT-2). Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave out special tokens (BOS, EOS, <|im_start|> ...). Default false. */
  skipSpecialTokens?: boolean;
}

export interface StreamDecoderOptions extends DecodeOptions {
  /**
   * Token ids that come before the streamed ones (the prompt). They are not emitted, but they
   * decide how the first streamed token is spelled: after "Once upon" a SentencePiece "▁a"
   * streams as " a", where at the very start of a text it would lose its leading space.
   */
  context?: readonly number[];
}

/**
 * Turns generated ids into text as they arrive. Text is emitted only once it is complete: a
 * character split over several byte tokens (byte-level BPE, SentencePiece byte fallback) is held
 * back until its last byte arrives. The pieces, followed by flush(), join into exactly what
 * `decode` gives for the same ids (with the same options).
 */
export interface StreamDecoder {
  /** Adds ids; returns the text they complete ("" when it is not complete yet). */
  push(...ids: number[]): string;
  /** Returns whatever is still held back (an unfinished character decodes as U+FFFD). */
  flush(): string;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool' | (string & {});
  content: string;
  /** Templates may read more fields (reasoning_content, tool_calls ...). */
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** End with the tokens that open an assistant turn. Default false. */
  addGenerationPrompt?: boolean;
  /** Extra variables for the template (Qwen3: { enable_thinking: false }). */
  templateArgs?: Record<string, unknown>;
  /** A Jinja template (or the name of one of the tokenizer's templates) instead of the default. */
  template?: string;
}

export interface ChatRendering {
  text: string;
  /** `text` encoded without adding special tokens (the template writes them), as Python does. */
  ids: number[];
}

export interface Tokenizer {
  /** The source it was loaded from (for messages). */
  readonly description: string;
  /** One more than the largest id the tokenizer can produce (base vocabulary plus added tokens). */
  readonly vocabSize: number;
  readonly bosTokenId: number | undefined;
  /** Ids that end generation: tokenizer_config's eos_token first, then generation_config's eos_token_id(s). */
  readonly eosTokenIds: readonly number[];
  /** tokenizer_config's pad_token, else generation_config's pad_token_id; undefined when neither names one. */
  readonly padTokenId: number | undefined;
  readonly unkTokenId: number | undefined;
  /** Ids of the special tokens (those decode skips with skipSpecialTokens). */
  readonly specialTokenIds: ReadonlySet<number>;
  readonly hasChatTemplate: boolean;

  encode(text: string, options?: EncodeOptions): number[];
  decode(ids: readonly number[], options?: DecodeOptions): string;
  /** A fresh incremental decoder for one generation. */
  streamDecoder(options?: StreamDecoderOptions): StreamDecoder;
  /** The id of a token spelled exactly so ("<|im_start|>", "Ġthe"), or undefined. */
  tokenToId(token: string): number | undefined;
  /** The vocabulary entry of an id (byte-level or ▁-spelling, not text), or undefined. */
  idToToken(id: number): string | undefined;
  /** Renders a conversation with the tokenizer's chat template. Throws TokenizerError when it has none. */
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): ChatRendering;
}

// ---------------------------------------------------------------------------------------------
// Loading

const TOKENIZER_JSON = 'tokenizer.json';
const TOKENIZER_CONFIG = 'tokenizer_config.json';
const GENERATION_CONFIG = 'generation_config.json';
const CHAT_TEMPLATE = 'chat_template.jinja';

/** Token models @huggingface/tokenizers implements (Rust's WordLevel is not among them). */
const MODEL_TYPES = ['BPE', 'WordPiece', 'Unigram'] as const;

let libraries: Promise<[TokenizersModule, JinjaModule]> | undefined;
function hfLibraries(): Promise<[TokenizersModule, JinjaModule]> {
  libraries ??= Promise.all([import('@huggingface/tokenizers'), import('@huggingface/jinja')]);
  return libraries;
}

type Json = Record<string, unknown>;

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

async function readFile(source: ModelSource, file: string): Promise<string | undefined> {
  try {
    return await source.readText(file);
  } catch (error) {
    throw new TokenizerError(source.description, file, `cannot be read: ${messageOf(error)}`, { cause: error });
  }
}

async function readJson(source: ModelSource, file: string, required: boolean): Promise<Json | undefined> {
  const text = await readFile(source, file);
  if (text === undefined) {
    if (required) throw new TokenizerError(source.description, file, 'not found (a tokenizer needs tokenizer.json)');
    return undefined;
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new TokenizerError(source.description, file, `is not valid JSON: ${messageOf(error)}`, { cause: error });
  }
  if (!isObject(value)) throw new TokenizerError(source.description, file, 'is not a JSON object');
  return value;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** A special token as tokenizer_config.json writes it: a string, or an AddedToken object. */
function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (isObject(value) && typeof value.content === 'string') return value.content;
  return undefined;
}

const SPECIAL_KEYS = ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token'];

/**
 * The subset of tokenizer_config.json handed to @huggingface/tokenizers, in the shape it expects:
 * the special tokens as plain strings (a Unigram model reads eos_token) and the additional special
 * tokens (decode's skip list). Keys it would act on but Python's fast tokenizer ignores
 * (remove_space, do_lowercase_and_remove_accent: slow-tokenizer options) are left out, and
 * clean-up is decided here per call instead of by its default (true).
 */
function configForTokenizers(config: Json): Json {
  const out: Json = { clean_up_tokenization_spaces: false };
  for (const key of SPECIAL_KEYS) {
    const content = tokenContent(config[key]);
    if (content !== undefined) out[key] = content;
  }
  // transformers 5 renamed additional_special_tokens to extra_special_tokens (a list, or a dict of named tokens).
  const extra = config.extra_special_tokens ?? config.additional_special_tokens;
  const list = Array.isArray(extra) ? extra : isObject(extra) ? Object.values(extra) : [];
  const additional = list.map(tokenContent).filter((t): t is string => t !== undefined);
  if (additional.length > 0) out.additional_special_tokens = additional;
  return out;
}

function checkTokenizerJson(source: string, json: Json): string {
  const model = json.model;
  if (!isObject(model)) throw new TokenizerError(source, TOKENIZER_JSON, 'has no "model" object');
  const type = model.type;
  if (typeof type !== 'string' || !(MODEL_TYPES as readonly string[]).includes(type)) {
    throw new TokenizerError(
      source,
      TOKENIZER_JSON,
      `unknown model type ${JSON.stringify(type)} (supported: ${MODEL_TYPES.join(', ')})`,
    );
  }
  if (!isObject(model.vocab) && !Array.isArray(model.vocab)) {
    throw new TokenizerError(source, TOKENIZER_JSON, `the ${type} model has no vocab`);
  }
  if (json.added_tokens !== undefined && !Array.isArray(json.added_tokens)) {
    throw new TokenizerError(source, TOKENIZER_JSON, '"added_tokens" is not a list');
  }
  return type;
}

/** Picks the template to use: chat_template.jinja, else tokenizer_config's (a string or a list of named ones). */
function chatTemplates(source: string, config: Json, jinja: string | undefined): Map<string, string> {
  const templates = new Map<string, string>();
  const value = config.chat_template;
  if (typeof value === 'string') templates.set('default', value);
  else if (Array.isArray(value)) {
    for (const entry of value) {
      if (!isObject(entry) || typeof entry.name !== 'string' || typeof entry.template !== 'string') {
        throw new TokenizerError(
          source,
          TOKENIZER_CONFIG,
          'chat_template must be a string or a list of {name, template}',
        );
      }
      templates.set(entry.name, entry.template);
    }
  } else if (value !== undefined && value !== null) {
    throw new TokenizerError(source, TOKENIZER_CONFIG, 'chat_template must be a string or a list of {name, template}');
  }
  if (jinja !== undefined) templates.set('default', jinja);
  return templates;
}

/** generation_config.json's token ids: a number, a list of numbers, or absent. */
function configIds(source: string, config: Json | undefined, key: string): number[] {
  const value = config?.[key];
  if (value === undefined || value === null) return [];
  const list = Array.isArray(value) ? value : [value];
  for (const id of list) {
    if (!Number.isSafeInteger(id) || (id as number) < 0) {
      throw new TokenizerError(
        source,
        GENERATION_CONFIG,
        `${key} must be a token id or a list of ids, got ${JSON.stringify(value)}`,
      );
    }
  }
  return list as number[];
}

/**
 * Loads tokenizer.json (required), tokenizer_config.json, generation_config.json and
 * chat_template.jinja (each optional) from a source and builds the tokenizer. Every failure is a
 * TokenizerError that names the source and the file.
 */
export async function loadTokenizer(source: ModelSource): Promise<Tokenizer> {
  const where = source.description;
  // Read in parallel (one round trip over a network), report failures in this order.
  const settled = await Promise.allSettled([
    readJson(source, TOKENIZER_JSON, true),
    readJson(source, TOKENIZER_CONFIG, false),
    readJson(source, GENERATION_CONFIG, false),
    readFile(source, CHAT_TEMPLATE),
  ]);
  for (const result of settled) if (result.status === 'rejected') throw result.reason;
  const [json, config, generation, jinja] = settled.map((r) => (r as PromiseFulfilledResult<unknown>).value) as [
    Json,
    Json | undefined,
    Json | undefined,
    string | undefined,
  ];
  const tokenizerJson = json;
  const modelType = checkTokenizerJson(where, tokenizerJson);
  const tokenizerConfig = config ?? {};
  if (tokenizerConfig.split_special_tokens === true) {
    throw new TokenizerError(
      where,
      TOKENIZER_CONFIG,
      'split_special_tokens: true (encoding special-token text as plain text) is not supported',
    );
  }

  // @huggingface/tokenizers expects every pipeline key to be present (null when unused) and the added tokens as a list.
  const forHf: Json = { ...tokenizerJson };
  for (const key of ['normalizer', 'pre_tokenizer', 'post_processor', 'decoder']) forHf[key] ??= null;
  forHf.added_tokens ??= [];

  const [{ Tokenizer: HfTokenizerClass }, { Template: JinjaTemplate }] = await hfLibraries();
  const hfConfig = configForTokenizers(tokenizerConfig);
  let hf: HfTokenizer;
  try {
    hf = new HfTokenizerClass(forHf, hfConfig);
  } catch (error) {
    throw new TokenizerError(where, TOKENIZER_JSON, `cannot be built: ${messageOf(error)}`, { cause: error });
  }
  keepByteOrderMarks(hf.decoder);

  const cleanUp =
    tokenizerConfig.clean_up_tokenization_spaces === true &&
    (modelType !== 'BPE' ||
      tokenizerConfig.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output === true);

  return new HfBackedTokenizer(where, hf, {
    compile: (template) => new JinjaTemplate(template),
    // The special tokens by name, as transformers gives them to a chat template (an empty one left out).
    specialTokens: Object.fromEntries(SPECIAL_KEYS.filter((key) => hfConfig[key]).map((key) => [key, hfConfig[key]])),
    config: tokenizerConfig,
    additionalSpecial: (hfConfig.additional_special_tokens as string[] | undefined) ?? [],
    generation,
    templates: chatTemplates(where, tokenizerConfig, jinja),
    cleanUp,
  });
}

/** The tokenizer of a model folder on disk (Node only: the folder is read with node:fs). */
export function loadTokenizerFromDirectory(path: string): Promise<Tokenizer> {
  return loadTokenizer(directorySource(path));
}

/** The tokenizer files under a base URL: the studio's own server, a mirror, a Hub "resolve" URL. */
export function loadTokenizerFromUrl(baseUrl: string, fetchImpl?: FetchLike): Promise<Tokenizer> {
  return loadTokenizer(urlSource(baseUrl, fetchImpl));
}

export interface HubOptions {
  /** A branch, tag or commit. Default "main". */
  revision?: string;
  /** Default https://huggingface.co (a mirror with the same URL layout works too). */
  endpoint?: string;
  fetch?: FetchLike;
}

/**
 * The tokenizer of a public Hugging Face Hub repository ("Qwen/Qwen3-0.6B"), read from
 * `<endpoint>/<repo>/resolve/<revision>/` through urlSource. No access token is sent, so gated and
 * private repositories fail (HTTP 401) with a TokenizerError; download those and use a folder.
 */
export function loadTokenizerFromHub(repoId: string, options: HubOptions = {}): Promise<Tokenizer> {
  if (!/^(?:[\w.-]+\/)?[\w.-]+$/.test(repoId) || repoId.split('/').some((part) => part === '.' || part === '..')) {
    return Promise.reject(
      new TokenizerError(repoId, undefined, 'not a Hub repository id (expected "owner/name" or "name")'),
    );
  }
  const endpoint = (options.endpoint ?? 'https://huggingface.co').replace(/\/+$/, '');
  const revision = encodeURIComponent(options.revision ?? 'main');
  return loadTokenizerFromUrl(`${endpoint}/${repoId}/resolve/${revision}/`, options.fetch);
}

// ---------------------------------------------------------------------------------------------
// The tokenizer

/** The clean-up transformers applies when clean_up_tokenization_spaces is on (same rules, same order). */
function cleanUpTokenization(text: string): string {
  return text
    .replaceAll(' .', '.')
    .replaceAll(' ?', '?')
    .replaceAll(' !', '!')
    .replaceAll(' ,', ',')
    .replaceAll(" ' ", "'")
    .replaceAll(" n't", "n't")
    .replaceAll(" 'm", "'m")
    .replaceAll(" 's", "'s")
    .replaceAll(" 've", "'ve")
    .replaceAll(" 're", "'re");
}

/**
 * Works around @huggingface/tokenizers 0.2.0: its ByteFallback decoder turns byte runs into text
 * with `new TextDecoder()`, which drops a U+FEFF at the start of each run as a byte-order mark,
 * where Rust's tokenizers keeps it ("joiner\uFEFFbom" decodes to "joinerbom"). Replaces that
 * decoder's TextDecoder with one that keeps it. Found by shape (config.type, text_decoder), so if
 * the library changes, this does nothing and the golden test with U+FEFF fails again.
 */
function keepByteOrderMarks(decoder: unknown): void {
  // The library's decoders are callable objects: functions with the decoder's fields.
  if (typeof decoder !== 'function' && !isObject(decoder)) return;
  const d = decoder as unknown as Json;
  if (isObject(d.config) && d.config.type === 'ByteFallback' && d.text_decoder instanceof TextDecoder) {
    d.text_decoder = new TextDecoder('utf-8', { ignoreBOM: true });
  }
  if (Array.isArray(d.decoders)) for (const inner of d.decoders) keepByteOrderMarks(inner);
}

interface TokenizerParts {
  /** Parses a Jinja template (compiled once per template and kept). */
  compile: (template: string) => Template;
  /** Template variables for the special tokens. */
  specialTokens: Record<string, unknown>;
  config: Json;
  /** tokenizer_config's additional (extra) special tokens: decode skips them too. */
  additionalSpecial: string[];
  generation: Json | undefined;
  templates: Map<string, string>;
  cleanUp: boolean;
}

class HfBackedTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosTokenId: number | undefined;
  readonly eosTokenIds: readonly number[];
  readonly padTokenId: number | undefined;
  readonly unkTokenId: number | undefined;
  readonly specialTokenIds: ReadonlySet<number>;
  readonly hasChatTemplate: boolean;
  private readonly tokens: (string | undefined)[];
  private readonly ids: Map<string, number>;
  private readonly templates: Map<string, string>;
  private readonly compiled = new Map<string, Template>();
  private readonly compile: (template: string) => Template;
  private readonly specialTokens: Record<string, unknown>;
  private readonly cleanUp: boolean;

  constructor(
    readonly description: string,
    private readonly hf: HfTokenizer,
    parts: TokenizerParts,
  ) {
    this.ids = hf.get_vocab();
    let size = 0;
    for (const id of this.ids.values()) size = Math.max(size, id + 1);
    this.vocabSize = size;
    this.tokens = new Array<string | undefined>(size);
    for (const [token, id] of this.ids) this.tokens[id] = token;

    const { config, generation } = parts;
    const named = (key: string): number | undefined => {
      const content = tokenContent(config[key]);
      if (content === undefined) return undefined;
      const id = this.ids.get(content);
      if (id === undefined) {
        throw new TokenizerError(
          description,
          TOKENIZER_CONFIG,
          `${key} ${JSON.stringify(content)} is not in the vocabulary`,
        );
      }
      return id;
    };
    const fromGeneration = (key: string): number[] => {
      const list = configIds(description, generation, key);
      for (const id of list) {
        if (id >= size) {
          throw new TokenizerError(
            description,
            GENERATION_CONFIG,
            `${key} ${id} is outside the vocabulary (size ${size})`,
          );
        }
      }
      return list;
    };

    this.bosTokenId = named('bos_token') ?? fromGeneration('bos_token_id')[0];
    this.eosTokenIds = [
      ...new Set([named('eos_token'), ...fromGeneration('eos_token_id')].filter((id) => id !== undefined)),
    ];
    this.padTokenId = named('pad_token') ?? fromGeneration('pad_token_id')[0];
    this.unkTokenId = named('unk_token');
    const special = new Set<number>();
    for (const [id, token] of hf.get_added_tokens_decoder()) if (token.special) special.add(id);
    for (const token of parts.additionalSpecial) {
      const id = this.ids.get(token);
      if (id !== undefined) special.add(id);
    }
    this.specialTokenIds = special;
    this.templates = parts.templates;
    this.compile = parts.compile;
    this.specialTokens = parts.specialTokens;
    this.hasChatTemplate = parts.templates.size > 0;
    this.cleanUp = parts.cleanUp;
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new TypeError(`encode: expected a string, got ${typeof text}`);
    return this.hf.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const text = this.decodeRaw(ids, options.skipSpecialTokens ?? false);
    return this.cleanUp ? cleanUpTokenization(text) : text;
  }

  /** Decode without the clean-up (the stream decoder applies it itself). */
  decodeRaw(ids: readonly number[], skipSpecialTokens: boolean): string {
    this.checkIds(ids);
    if (ids.length === 0) return ''; // @huggingface/tokenizers rejects an empty list
    return this.hf.decode([...ids], { skip_special_tokens: skipSpecialTokens, clean_up_tokenization_spaces: false });
  }

  private checkIds(ids: readonly number[]): void {
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize || this.tokens[id] === undefined) {
        throw new TokenizerError(
          this.description,
          undefined,
          `token id ${id} is not in the vocabulary (size ${this.vocabSize})`,
        );
      }
    }
  }

  streamDecoder(options: StreamDecoderOptions = {}): StreamDecoder {
    const context = options.context ?? [];
    this.checkIds(context);
    return new IncrementalDecoder(
      (ids) => this.decodeRaw(ids, options.skipSpecialTokens ?? false),
      this.cleanUp,
      context,
    );
  }

  tokenToId(token: string): number | undefined {
    return this.ids.get(token);
  }

  idToToken(id: number): string | undefined {
    return Number.isInteger(id) && id >= 0 ? this.tokens[id] : undefined;
  }

  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): ChatRendering {
    const template = this.resolveTemplate(options.template);
    let text: string;
    try {
      let compiled = this.compiled.get(template);
      if (compiled === undefined) {
        compiled = this.compile(template);
        this.compiled.set(template, compiled);
      }
      // The variables transformers gives a template: messages, the generation flag, no tools or
      // documents, the special tokens by name, then the caller's own.
      text = compiled.render({
        messages: messages as ChatMessage[],
        add_generation_prompt: options.addGenerationPrompt ?? false,
        tools: null,
        documents: null,
        ...this.specialTokens,
        ...options.templateArgs,
      });
    } catch (error) {
      throw new TokenizerError(this.description, undefined, `the chat template failed: ${messageOf(error)}`, {
        cause: error,
      });
    }
    return { text, ids: this.encode(text, { addSpecialTokens: false }) };
  }

  private resolveTemplate(requested: string | undefined): string {
    if (requested !== undefined) return this.templates.get(requested) ?? requested;
    const template = this.templates.get('default');
    if (template !== undefined) return template;
    if (this.templates.size === 0) {
      throw new TokenizerError(
        this.description,
        undefined,
        'has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja); pass one with { template }',
      );
    }
    throw new TokenizerError(
      this.description,
      TOKENIZER_CONFIG,
      `has several chat templates and none named "default"; choose one with { template }: ${[...this.templates.keys()].join(', ')}`,
    );
  }
}

/** How many ids of a stream decoder's context are decoded with the first streamed ids. */
const CONTEXT_TOKENS = 8;

/**
 * Decodes a sliding window of ids: `prefix` = ids[prefixStart, readEnd) were already emitted;
 * decoding ids[prefixStart, end) and dropping the prefix's text gives the new text with the
 * spelling (leading spaces) it has in context. The window moves on once the new text is complete,
 * i.e. does not end in U+FFFD, the mark of an unfinished UTF-8 sequence.
 *
 * With clean_up_tokenization_spaces on, text is also held while a clean-up rule could still
 * change it: every rule starts with a space and spans at most 4 characters, so text whose last 3
 * characters hold no space cleans up the same whatever follows.
 */
class IncrementalDecoder implements StreamDecoder {
  private readonly ids: number[];
  private prefixStart = 0;
  private readEnd: number;
  private pending = '';

  constructor(
    private readonly decodeRaw: (ids: readonly number[]) => string,
    private readonly cleanUp: boolean,
    context: readonly number[],
  ) {
    this.ids = context.slice(-CONTEXT_TOKENS);
    this.readEnd = this.ids.length;
  }

  push(...ids: number[]): string {
    if (ids.length === 0) return '';
    this.ids.push(...ids);
    const prefix = this.decodeRaw(this.ids.slice(this.prefixStart, this.readEnd));
    const text = this.decodeRaw(this.ids.slice(this.prefixStart));
    if (text.length <= prefix.length || text.endsWith('\uFFFD')) return '';
    this.prefixStart = this.readEnd;
    this.readEnd = this.ids.length;
    return this.release(text.slice(prefix.length), false);
  }

  flush(): string {
    let piece = '';
    if (this.readEnd < this.ids.length) {
      const prefix = this.decodeRaw(this.ids.slice(this.prefixStart, this.readEnd));
      piece = this.decodeRaw(this.ids.slice(this.prefixStart)).slice(prefix.length);
      this.prefixStart = this.readEnd;
      this.readEnd = this.ids.length;
    }
    return this.release(piece, true);
  }

  private release(piece: string, final: boolean): string {
    if (!this.cleanUp) return piece;
    this.pending += piece;
    if (!final && this.pending.slice(-3).includes(' ')) return '';
    const out = cleanUpTokenization(this.pending);
    this.pending = '';
    return out;
  }
}
