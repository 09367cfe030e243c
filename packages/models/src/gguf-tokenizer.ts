/**
 * The tokenizer of a GGUF base model: the model's own tokenizer.json beside the file when there
 * is one (exactly the Hub's tokenizer), else one rebuilt from the GGUF metadata for byte-level BPE
 * vocabularies (tokenizer.ggml.model "gpt2": GPT-2, Llama 3, Qwen2/2.5/3, SmolLM) as the
 * tokenizer.json that tokenizer.ts loads:
 *
 *   vocabulary   tokenizer.ggml.tokens (the id is the index), merges tokenizer.ggml.merges
 *   specials     token_type 3 (control) as special added tokens, 4 (user-defined) as added tokens
 *   pre-split    by tokenizer.ggml.pre, the regex each model family's tokenizer.json uses:
 *                "gpt-2" (the default), "qwen2", "llama-bpe", "smollm"; any other is refused
 *   BOS          added in front when tokenizer.ggml.add_bos_token is true
 *   chat         tokenizer.chat_template
 *
 * SentencePiece vocabularies (tokenizer.ggml.model "llama": Llama 2, TinyLlama) are not rebuilt:
 * their merges would have to be derived from scores; such a file needs its tokenizer.json beside it.
 */
import { GgufError, type GgufHeader, readGgufHeader } from './gguf.js';
import type { ModelSource } from './source.js';
import { loadTokenizer, type Tokenizer } from './tokenizer.js';

const LLAMA3_REGEX =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_REGEX =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const byteLevel = (useRegex: boolean, trimOffsets = false) => ({
  type: 'ByteLevel',
  add_prefix_space: false,
  trim_offsets: trimOffsets,
  use_regex: useRegex,
});
const split = (regex: string) => ({ type: 'Split', pattern: { Regex: regex }, behavior: 'Isolated', invert: false });

/** tokenizer.ggml.pre -> the pre-tokenizer and normalizer of that family's tokenizer.json. */
const PRE: Record<string, { pre: unknown; normalizer?: unknown; ignoreMerges?: boolean }> = {
  'gpt-2': { pre: byteLevel(true, true) },
  qwen2: {
    pre: { type: 'Sequence', pretokenizers: [split(QWEN2_REGEX), byteLevel(false)] },
    normalizer: { type: 'NFC' },
  },
  'llama-bpe': {
    pre: { type: 'Sequence', pretokenizers: [split(LLAMA3_REGEX), byteLevel(false, true)] },
    ignoreMerges: true,
  },
  smollm: {
    pre: { type: 'Sequence', pretokenizers: [{ type: 'Digits', individual_digits: true }, byteLevel(true, true)] },
  },
};

function stringArray(h: GgufHeader, key: string): string[] {
  const v = h.metadata.get(key);
  if (!Array.isArray(v) || v.some((x) => typeof x !== 'string'))
    throw new GgufError(h.file, key, 'must be a list of strings');
  return v as string[];
}

function optionalId(h: GgufHeader, key: string, vocab: number): number | undefined {
  const v = h.metadata.get(key);
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v >= vocab)
    throw new GgufError(h.file, key, `${String(v)} is not a token id of the ${vocab}-token vocabulary`);
  return v;
}

/** tokenizer.json and tokenizer_config.json for a byte-level BPE vocabulary in GGUF metadata. */
export function ggufTokenizerFiles(h: GgufHeader): { tokenizer: unknown; config: unknown } {
  const model = h.metadata.get('tokenizer.ggml.model');
  if (model !== 'gpt2') {
    throw new GgufError(
      h.file,
      'tokenizer.ggml.model',
      `"${String(model)}" vocabularies are not rebuilt from GGUF metadata (byte-level BPE, "gpt2", is); put the model's tokenizer.json and tokenizer_config.json beside the file`,
    );
  }
  const pre = h.metadata.get('tokenizer.ggml.pre') ?? 'gpt-2';
  const family = typeof pre === 'string' ? PRE[pre === 'default' || pre === 'gpt2' ? 'gpt-2' : pre] : undefined;
  if (!family) {
    throw new GgufError(
      h.file,
      'tokenizer.ggml.pre',
      `"${String(pre)}" is not supported; supported: ${Object.keys(PRE).join(', ')} (or put the model's tokenizer.json beside the file)`,
    );
  }
  const tokens = stringArray(h, 'tokenizer.ggml.tokens');
  const merges = stringArray(h, 'tokenizer.ggml.merges');
  const typesValue = h.metadata.get('tokenizer.ggml.token_type');
  const types = Array.isArray(typesValue) ? (typesValue as number[]) : [];
  if (types.length !== 0 && types.length !== tokens.length)
    throw new GgufError(h.file, 'tokenizer.ggml.token_type', `${types.length} types for ${tokens.length} tokens`);
  const vocab: Record<string, number> = {};
  const added: unknown[] = [];
  tokens.forEach((content, id) => {
    if (vocab[content] === undefined) vocab[content] = id;
    const type = types[id];
    if (type === 3 || type === 4) {
      added.push({
        id,
        content,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: type === 3,
      });
    }
  });
  const bos = optionalId(h, 'tokenizer.ggml.bos_token_id', tokens.length);
  const eos = optionalId(h, 'tokenizer.ggml.eos_token_id', tokens.length);
  const addBos = h.metadata.get('tokenizer.ggml.add_bos_token') === true && bos !== undefined;
  const bosText = bos === undefined ? undefined : tokens[bos];
  const tokenizer = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: family.normalizer ?? null,
    pre_tokenizer: family.pre,
    post_processor: addBos
      ? {
          type: 'TemplateProcessing',
          single: [{ SpecialToken: { id: bosText, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
          pair: [
            { SpecialToken: { id: bosText, type_id: 0 } },
            { Sequence: { id: 'A', type_id: 0 } },
            { SpecialToken: { id: bosText, type_id: 1 } },
            { Sequence: { id: 'B', type_id: 1 } },
          ],
          special_tokens: { [bosText as string]: { id: bosText, ids: [bos], tokens: [bosText] } },
        }
      : byteLevel(false),
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: family.ignoreMerges ?? false,
      vocab,
      merges,
    },
  };
  const template = h.metadata.get('tokenizer.chat_template');
  const config = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    ...(bosText !== undefined ? { bos_token: bosText } : {}),
    ...(eos !== undefined ? { eos_token: tokens[eos] } : {}),
    add_bos_token: addBos,
    clean_up_tokenization_spaces: false,
    ...(typeof template === 'string' ? { chat_template: template } : {}),
  };
  return { tokenizer, config };
}

/** Only tokenizer.json and tokenizer_config.json, served from memory (a folder's other files
 * may belong to other models). */
function tokenizerFilesSource(description: string, files: Record<string, string>): ModelSource {
  const text = (name: string) => (Object.hasOwn(files, name) ? files[name] : undefined);
  return {
    description,
    readText: async (name) => text(name),
    size: async (name) => {
      const t = text(name);
      return t === undefined ? undefined : new TextEncoder().encode(t).byteLength;
    },
    readRange: async (name, start, end) => new TextEncoder().encode(text(name) ?? '').slice(start, end),
  };
}

/** The tokenizer for a GGUF file of `source`: tokenizer.json beside it, or the file's metadata. */
export async function loadGgufTokenizer(source: ModelSource, file: string): Promise<Tokenizer> {
  if ((await source.size('tokenizer.json')) !== undefined) return loadTokenizer(source);
  const h = await readGgufHeader(source, file);
  const { tokenizer, config } = ggufTokenizerFiles(h);
  return loadTokenizer(
    tokenizerFilesSource(`${source.description}/${file} (GGUF metadata)`, {
      'tokenizer.json': JSON.stringify(tokenizer),
      'tokenizer_config.json': JSON.stringify(config),
    }),
  );
}
