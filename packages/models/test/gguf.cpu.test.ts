// The GGUF reader and model mapping without a GPU: the committed fixtures' headers, the k-quant
// decoders against the gguf Python package (packages/core/test/golden/quant.json), and bad input
// (not GGUF, an old version, truncation, unsupported types and architectures, metadata that
// contradicts the tensors, missing and unexpected tensors), each a GgufError naming the tensor or
// key and what is supported, raised before any GPU work; and random corruption of a header, which
// must end in a result or a GgufError, never anything else.
import { describe, expect, it } from 'vitest';
import kGolden from '../../core/test/golden/quant.json';
import { decodeGgml } from '../src/ggml.js';
import { GgufError, type GgufHeader, readGgufHeader } from '../src/gguf.js';
import { ggufBaseModelId, openGgufModel } from '../src/gguf-model.js';
import { directorySource, filesSource } from '../src/source.js';
import { type TestTensor, type TestValue, writeGguf } from './gguf-writer.js';

function bytes(b64: string): Uint8Array {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

const fixtures = async (dir: string) => {
  const { fileURLToPath } = await import('node:url');
  return directorySource(fileURLToPath(new URL(`./fixtures/gguf/${dir}`, import.meta.url)));
};

const u32 = (value: number): TestValue => ({ type: 'u32', value });
const str = (value: string): TestValue => ({ type: 'string', value });
const zeros = (n: number, bytesPer = 4) => new Uint8Array(n * bytesPer);

/** A valid one-layer Llama: d 32, 2 heads of 16, ffn 32, vocab 8, F32 zeros. */
function tinyLlama(): { meta: [string, TestValue][]; tensors: TestTensor[] } {
  const meta: [string, TestValue][] = [
    ['general.architecture', str('llama')],
    ['general.source.repo_url', str('https://huggingface.co/org/tiny')],
    ['llama.context_length', u32(64)],
    ['llama.embedding_length', u32(32)],
    ['llama.block_count', u32(1)],
    ['llama.feed_forward_length', u32(32)],
    ['llama.attention.head_count', u32(2)],
    ['llama.attention.head_count_kv', u32(2)],
    ['llama.attention.layer_norm_rms_epsilon', { type: 'f32', value: 1e-5 }],
    ['tokenizer.ggml.tokens', { type: 'array', of: 'string', value: ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'] }],
  ];
  const m = (name: string, rows: number, cols: number): TestTensor => ({
    name,
    type: 'F32',
    shape: [rows, cols],
    data: zeros(rows * cols),
  });
  const v = (name: string, n: number): TestTensor => ({ name, type: 'F32', shape: [n], data: zeros(n) });
  const tensors = [
    m('token_embd.weight', 8, 32),
    v('output_norm.weight', 32),
    m('output.weight', 8, 32),
    v('blk.0.attn_norm.weight', 32),
    v('blk.0.ffn_norm.weight', 32),
    m('blk.0.attn_q.weight', 32, 32),
    m('blk.0.attn_k.weight', 32, 32),
    m('blk.0.attn_v.weight', 32, 32),
    m('blk.0.attn_output.weight', 32, 32),
    m('blk.0.ffn_gate.weight', 32, 32),
    m('blk.0.ffn_up.weight', 32, 32),
    m('blk.0.ffn_down.weight', 32, 32),
  ];
  return { meta, tensors };
}

const asSource = (data: Uint8Array, name = 'model.gguf') => filesSource([new File([data as BlobPart], name)]);

async function openBytes(data: Uint8Array) {
  return openGgufModel(asSource(data), 'model.gguf');
}

function withMeta(key: string, value: TestValue | undefined) {
  const t = tinyLlama();
  const meta = t.meta.filter(([k]) => k !== key);
  if (value) meta.push([key, value]);
  return writeGguf(meta, t.tensors);
}

describe('GGUF headers', () => {
  it('reads the fixtures: metadata, types and shapes', async () => {
    const h = await readGgufHeader(await fixtures('stories'), 'tiny-qwen2-q.gguf');
    expect(h.version).toBe(3);
    expect(h.metadata.get('general.architecture')).toBe('qwen2');
    expect(h.metadata.get('qwen2.embedding_length')).toBe(64);
    expect((h.metadata.get('tokenizer.ggml.tokens') as string[]).length).toBe(512);
    expect(h.tensors.get('blk.0.attn_q.weight')).toMatchObject({ type: 'Q4_0', shape: [64, 64] });
    expect(h.tensors.get('blk.0.attn_q.bias')).toMatchObject({ type: 'F32', shape: [64] });
    expect(h.tensors.get('token_embd.weight')).toMatchObject({ type: 'BF16', shape: [512, 64] });
    const g = await openGgufModel(await fixtures('gpt2'), 'tiny-gpt2-q.gguf');
    expect(g.config.architecture).toBe('GPT2LMHeadModel');
    expect(g.config.intermediateSize).toBe(96);
    expect(g.baseModelId).toBe('webtune-test/tiny-gpt2-q');
    const k = await openGgufModel(await fixtures('stories'), 'tiny-llama-k.gguf');
    expect(k.ropeInvFreq?.length).toBe(32);
    expect([...k.permuted.keys()]).toEqual([
      'model.layers.0.self_attn.q_proj.weight',
      'model.layers.0.self_attn.k_proj.weight',
    ]);
  });

  it('decodes Q4_K and Q6_K as the gguf package does', () => {
    for (const k of kGolden.k_quants) {
      const blocks = bytes(k.blocks);
      const want = new Float32Array(bytes(k.dequantized).buffer);
      const got = new Float32Array(want.length);
      decodeGgml(k.type as 'Q4_K' | 'Q6_K', blocks, got);
      expect(got, k.type).toEqual(want);
    }
  });

  it('maps a minimal Llama and names its Hub model', async () => {
    const t = tinyLlama();
    const g = await openBytes(writeGguf(t.meta, t.tensors));
    expect(g.config).toMatchObject({
      architecture: 'LlamaForCausalLM',
      hiddenSize: 32,
      numLayers: 1,
      vocabSize: 8,
      tieWordEmbeddings: false,
    });
    expect(g.baseModelId).toBe('org/tiny');
    const header = (meta: [string, string][]) => ({ metadata: new Map(meta) }) as unknown as GgufHeader;
    expect(ggufBaseModelId(header([['general.repo_url', 'https://huggingface.co/a/b']]))).toBe('a/b');
    expect(ggufBaseModelId(header([['general.source.huggingface.repository', 'x/y']]))).toBe('x/y');
    // A fine-tune's parent is not the model these weights are.
    expect(
      ggufBaseModelId(header([['general.base_model.0.repo_url', 'https://huggingface.co/a/base']])),
    ).toBeUndefined();
  });
});

describe('bad GGUF input', () => {
  const cases: [string, () => Uint8Array, RegExp][] = [
    ['not GGUF', () => new TextEncoder().encode('{"a": 1}                      '), /not a GGUF file/],
    [
      'version 1',
      () => {
        const t = tinyLlama();
        return writeGguf(t.meta, t.tensors, 32, 1);
      },
      /GGUF version 1 is not supported \(2 and 3 are\)/,
    ],
    [
      'unsupported architecture',
      () => withMeta('general.architecture', str('mamba')),
      /general\.architecture.*"mamba" is not supported; supported: llama, qwen2, qwen3, gpt2/,
    ],
    [
      'metadata against the tensors',
      () => withMeta('llama.embedding_length', u32(48)),
      /llama\.embedding_length.*48 does not match token_embd\.weight's width 32/,
    ],
    ['a key missing', () => withMeta('llama.block_count', undefined), /llama\.block_count.*missing/],
    [
      'tokens against the embedding',
      () => withMeta('tokenizer.ggml.tokens', { type: 'array', of: 'string', value: ['a'] }),
      /1 tokens, but token_embd\.weight has 8 rows/,
    ],
    [
      'an unsupported tensor type',
      () => {
        const t = tinyLlama();
        const tensors = t.tensors.map((x) =>
          x.name === 'blk.0.ffn_up.weight' ? { ...x, type: 'Q5_K', shape: [32, 256], data: zeros(32, 176) } : x,
        );
        return writeGguf(t.meta, tensors);
      },
      /ffn_up\.weight.*(shape \[32, 256\]|type Q5_K is not supported; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)/,
    ],
    [
      'a type id ggml does not have',
      () => {
        const t = tinyLlama();
        return writeGguf(
          t.meta,
          t.tensors.map((x) => (x.name === 'output.weight' ? { ...x, type: 99 } : x)),
        );
      },
      /"output\.weight": unknown ggml type 99/,
    ],
    [
      'a wrong shape',
      () => {
        const t = tinyLlama();
        return writeGguf(
          t.meta,
          t.tensors.map((x) => (x.name === 'blk.0.attn_k.weight' ? { ...x, shape: [16, 32], data: zeros(512) } : x)),
        );
      },
      /attn_k\.weight.*shape \[16, 32\].*needs \[32, 32\]/,
    ],
    [
      'a missing tensor',
      () => {
        const t = tinyLlama();
        return writeGguf(
          t.meta,
          t.tensors.filter((x) => x.name !== 'blk.0.attn_v.weight'),
        );
      },
      /missing blk\.0\.attn_v\.weight \(model\.layers\.0\.self_attn\.v_proj\.weight\)/,
    ],
    [
      'an unexpected tensor',
      () => {
        const t = tinyLlama();
        return writeGguf(t.meta, [
          ...t.tensors,
          { name: 'blk.0.ffn_gate_inp.weight', type: 'F32', shape: [4, 32], data: zeros(128) },
        ]);
      },
      /unexpected tensors for LlamaForCausalLM: blk\.0\.ffn_gate_inp\.weight/,
    ],
    [
      'rows that are not whole blocks',
      () => {
        const t = tinyLlama();
        return writeGguf(
          t.meta,
          t.tensors.map((x) =>
            x.name === 'blk.0.attn_q.weight' ? { ...x, type: 'Q8_0', shape: [32, 48], data: zeros(32 * 51, 1) } : x,
          ),
        );
      },
      /attn_q\.weight.*Q8_0 rows of 48 values are not whole blocks of 32/,
    ],
  ];
  for (const [name, make, message] of cases) {
    it(name, async () => {
      const error = await openBytes(make()).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(GgufError);
      expect((error as Error).message).toMatch(message);
    });
  }

  it('a file cut anywhere is truncated, never read past its end', async () => {
    const t = tinyLlama();
    const whole = writeGguf(t.meta, t.tensors);
    for (const cut of [3, 10, 30, 100, 400, 700, whole.byteLength - 5000, whole.byteLength - 1]) {
      const error = await openBytes(whole.slice(0, cut)).catch((e: unknown) => e);
      expect(error, `cut at ${cut}`).toBeInstanceOf(GgufError);
      expect((error as Error).message, `cut at ${cut}`).toMatch(/truncated|not a GGUF file/);
    }
  });

  it('random corruption of a real header gives a result or a GgufError', async () => {
    const source = await fixtures('gpt2');
    const size = (await source.size('tiny-gpt2-q.gguf')) as number;
    const original = await source.readRange('tiny-gpt2-q.gguf', 0, size);
    const head = (await readGgufHeader(source, 'tiny-gpt2-q.gguf')).dataStart;
    let seed = 12345;
    const rand = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    let typed = 0;
    for (let i = 0; i < 200; i++) {
      const data = original.slice();
      for (let j = 0; j < 1 + Math.floor(rand() * 3); j++) data[Math.floor(rand() * head)] = Math.floor(rand() * 256);
      try {
        await openBytes(data);
      } catch (e) {
        if (!(e instanceof GgufError) && !(e instanceof Error && e.name === 'ConfigError')) throw e;
        typed++;
      }
    }
    expect(typed).toBeGreaterThan(0);
  });
});
