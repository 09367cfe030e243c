// Tokenizers of GGUF base models: rebuilt from the metadata of a byte-level BPE vocabulary and
// compared with transformers' tokenization — of the GPT-2 fixture's GGUF (golden from
// tools/golden_gguf_train.py, transformers reading the same metadata) and of Qwen3's vocabulary
// written into a GGUF here from its tokenizer.json (golden/tokenizers/qwen3.json) — and the
// tokenizer.json beside a file taking precedence; SentencePiece metadata and an unknown
// pre-tokenizer are refused with what to do.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { GgufError } from '../src/gguf.js';
import { loadGgufTokenizer } from '../src/gguf-tokenizer.js';
import { directorySource, filesSource } from '../src/source.js';
import { type TestValue, writeGguf } from './gguf-writer.js';

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));
const json = (p: string) => JSON.parse(readFileSync(here(p), 'utf8'));

interface TokenizerJson {
  model: { vocab: Record<string, number>; merges: (string | [string, string])[] };
  added_tokens: { id: number; content: string; special: boolean }[];
}

/** A GGUF holding only a tokenizer's metadata, as llama.cpp's converter writes it. */
function metadataOnly(t: TokenizerJson, pre: string, extra: [string, TestValue][] = []): Uint8Array {
  const ids = [...Object.values(t.model.vocab), ...t.added_tokens.map((a) => a.id)];
  const size = ids.reduce((m, id) => Math.max(m, id), 0) + 1;
  const tokens = new Array<string>(size).fill('');
  const types = new Array<number>(size).fill(1);
  for (const [tok, id] of Object.entries(t.model.vocab)) tokens[id] = tok;
  for (const a of t.added_tokens) {
    tokens[a.id] = a.content;
    types[a.id] = a.special ? 3 : 4;
  }
  const merges = t.model.merges.map((m) => (typeof m === 'string' ? m : m.join(' ')));
  return writeGguf(
    [
      ['general.architecture', { type: 'string', value: 'qwen3' }],
      ['tokenizer.ggml.model', { type: 'string', value: 'gpt2' }],
      ['tokenizer.ggml.pre', { type: 'string', value: pre }],
      ['tokenizer.ggml.tokens', { type: 'array', of: 'string', value: tokens }],
      ['tokenizer.ggml.token_type', { type: 'array', of: 'i32', value: types }],
      ['tokenizer.ggml.merges', { type: 'array', of: 'string', value: merges }],
      ...extra,
    ],
    [],
  );
}

describe('GGUF tokenizers', () => {
  it('the GPT-2 fixture: tokenized from its metadata as transformers does', async () => {
    const golden = json('../../train/test/golden/gguf-train/tiny-gpt2-q.json') as {
      tokenized: { text: string; ids: number[] }[];
    };
    const tok = await loadGgufTokenizer(directorySource(here('./fixtures/gguf/gpt2')), 'tiny-gpt2-q.gguf');
    expect(tok.description).toMatch(/tiny-gpt2-q\.gguf \(GGUF metadata\)/);
    for (const { text, ids } of golden.tokenized) {
      expect(tok.encode(text), text).toEqual(ids);
      expect(tok.decode(ids)).toBe(text);
    }
  });

  it("Qwen3's vocabulary from GGUF metadata encodes the golden cases", async () => {
    const t = json('./fixtures/tokenizers/qwen3/tokenizer.json') as TokenizerJson;
    const golden = json('./golden/tokenizers/qwen3.json') as { cases: { text: string; ids: number[] }[] };
    const gguf = metadataOnly(t, 'qwen2', [['tokenizer.ggml.eos_token_id', { type: 'u32', value: 151645 }]]);
    const tok = await loadGgufTokenizer(filesSource([new File([gguf as BlobPart], 'q.gguf')]), 'q.gguf');
    expect(tok.vocabSize).toBe(151669);
    expect(tok.eosTokenIds[0]).toBe(151645);
    for (const c of golden.cases) expect(tok.encode(c.text), JSON.stringify(c.text)).toEqual(c.ids);
  });

  it('prefers the tokenizer.json beside the file', async () => {
    const tok = await loadGgufTokenizer(directorySource(here('./fixtures/gguf/stories')), 'tiny-llama-q.gguf');
    expect(tok.vocabSize).toBe(512);
    expect(tok.encode('Once upon a time')[0]).toBe(1); // stories260K adds <s>
  });

  it('refuses SentencePiece metadata and unknown pre-tokenizers, saying what to do', async () => {
    const sp = writeGguf([['tokenizer.ggml.model', { type: 'string', value: 'llama' }]], []);
    await expect(loadGgufTokenizer(filesSource([new File([sp as BlobPart], 's.gguf')]), 's.gguf')).rejects.toThrow(
      /tokenizer\.ggml\.model.*"llama" vocabularies are not rebuilt .*put the model's tokenizer\.json and tokenizer_config\.json beside the file/,
    );
    const t = { model: { vocab: { a: 0, b: 1 }, merges: [] }, added_tokens: [] };
    const odd = metadataOnly(t, 'deepseek-v3');
    const error = await loadGgufTokenizer(filesSource([new File([odd as BlobPart], 'o.gguf')]), 'o.gguf').catch(
      (e) => e,
    );
    expect(error).toBeInstanceOf(GgufError);
    expect((error as Error).message).toMatch(
      /tokenizer\.ggml\.pre.*"deepseek-v3" is not supported; supported: gpt-2, qwen2, llama-bpe, smollm/,
    );
  });
});
