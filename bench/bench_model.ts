/**
 * Writes the random-init model shaped like SmolLM2-135M (LlamaForCausalLM: hidden 576,
 * intermediate 1536, 30 layers, 9 heads, 3 KV heads, head_dim 64, vocab 49152, tied embeddings,
 * rope_theta 100000, rms_norm_eps 1e-5, 2048 positions) that the `models` and `train` suites run,
 * webtune in the browser and PyTorch on the CPU alike. Node only (run by bench/run.ts, which has
 * registered the `?raw` import hooks @webtune/models needs).
 *
 * Values: matrices uniform in ±0.02·√3 (standard deviation 0.02, the Llama initializer range)
 * from a fixed seed; norm weights 1. Stored as F16 (269 MB), which is what webtune uploads
 * anyway; PyTorch reads the same F16 values into float32. No tokenizer: benchmarks use fixed
 * token ids. The folder is rewritten only when its stamp (this generator's version and spec)
 * differs, so later runs reuse it.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type SerializableTensor, serializeSafetensors } from '@webtune/models';
import { BENCH_MODELS } from './cases.js';

const SPEC = BENCH_MODELS['smollm2-135m-random'];
const SEED = 135;
const STD = 0.02;
const GENERATOR_VERSION = 1;

const CONFIG = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  torch_dtype: 'float16',
  vocab_size: SPEC.vocab,
  hidden_size: SPEC.hidden,
  intermediate_size: SPEC.intermediate,
  num_hidden_layers: SPEC.layers,
  num_attention_heads: SPEC.heads,
  num_key_value_heads: SPEC.kvHeads,
  head_dim: SPEC.headDim,
  hidden_act: 'silu',
  max_position_embeddings: SPEC.maxPositions,
  rms_norm_eps: 1e-5,
  rope_theta: 100000.0,
  rope_scaling: null,
  attention_bias: false,
  attention_dropout: 0.0,
  mlp_bias: false,
  tie_word_embeddings: true,
  initializer_range: STD,
  use_cache: true,
  bos_token_id: 0,
  eos_token_id: 0,
  pad_token_id: null,
};

/** Uniform values with standard deviation `std`, from an LCG continued across tensors. */
class Values {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  fill(n: number, std: number): Float32Array {
    const out = new Float32Array(n);
    const half = std * Math.sqrt(3);
    let s = this.s;
    for (let i = 0; i < n; i++) {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
      out[i] = (s / 4294967296) * 2 * half - half;
    }
    this.s = s;
    return out;
  }
}

function tensors(): SerializableTensor[] {
  const v = new Values(SEED);
  const d = SPEC.hidden;
  const q = SPEC.heads * SPEC.headDim;
  const kv = SPEC.kvHeads * SPEC.headDim;
  const I = SPEC.intermediate;
  const out: SerializableTensor[] = [];
  const matrix = (name: string, rows: number, cols: number) =>
    out.push({ name, dtype: 'F16', shape: [rows, cols], data: v.fill(rows * cols, STD) });
  const ones = (name: string, n: number) =>
    out.push({ name, dtype: 'F16', shape: [n], data: new Float32Array(n).fill(1) });
  matrix('model.embed_tokens.weight', SPEC.vocab, d);
  for (let l = 0; l < SPEC.layers; l++) {
    const p = `model.layers.${l}`;
    ones(`${p}.input_layernorm.weight`, d);
    matrix(`${p}.self_attn.q_proj.weight`, q, d);
    matrix(`${p}.self_attn.k_proj.weight`, kv, d);
    matrix(`${p}.self_attn.v_proj.weight`, kv, d);
    matrix(`${p}.self_attn.o_proj.weight`, d, q);
    ones(`${p}.post_attention_layernorm.weight`, d);
    matrix(`${p}.mlp.gate_proj.weight`, I, d);
    matrix(`${p}.mlp.up_proj.weight`, I, d);
    matrix(`${p}.mlp.down_proj.weight`, d, I);
  }
  ones('model.norm.weight', d);
  return out;
}

/** JSON laid out as the repository's formatter (biome) lays it out: objects one key per line,
 * short lists of scalars on one line; so the folder passes `biome check` even before it is
 * ignored. */
function prettyJson(value: unknown, indent = ''): string {
  if (Array.isArray(value) && value.every((v) => v === null || typeof v !== 'object'))
    return `[${value.map((v) => JSON.stringify(v)).join(', ')}]`;
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const inner = `${indent}  `;
    const entries = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${prettyJson(v, inner)}`);
    return entries.length === 0 ? '{}' : `{\n${entries.join(',\n')}\n${indent}}`;
  }
  return JSON.stringify(value);
}

export interface BenchModelResult {
  readonly dir: string;
  readonly created: boolean;
  readonly bytes: number;
  readonly seconds: number;
}

/** Makes sure `<root>/<SPEC.dir>` holds the model; returns its absolute path. */
export function ensureBenchModel(root: string): BenchModelResult {
  const dir = join(root, SPEC.dir);
  const stamp = {
    about: 'Random-init model shaped like SmolLM2-135M, written by bench/bench_model.ts for pnpm bench; not committed.',
    generator: GENERATOR_VERSION,
    seed: SEED,
    std: STD,
    config: CONFIG,
  };
  const stampFile = join(dir, 'webtune_bench.json');
  const weights = join(dir, 'model.safetensors');
  if (existsSync(stampFile) && existsSync(weights)) {
    let old: unknown;
    try {
      old = JSON.parse(readFileSync(stampFile, 'utf8'));
    } catch {
      old = undefined;
    }
    if (JSON.stringify(old) === JSON.stringify(stamp))
      return { dir, created: false, bytes: statSync(weights).size, seconds: 0 };
  }
  const t0 = performance.now();
  rmSync(dir, { recursive: true, force: true });
  const tmp = `${dir}.tmp`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  const bytes = serializeSafetensors(tensors(), { format: 'pt' });
  writeFileSync(join(tmp, 'model.safetensors'), bytes);
  writeFileSync(join(tmp, 'config.json'), `${prettyJson(CONFIG)}\n`);
  writeFileSync(
    join(tmp, 'generation_config.json'),
    `${prettyJson({ bos_token_id: 0, eos_token_id: 0, do_sample: false })}\n`,
  );
  writeFileSync(join(tmp, 'webtune_bench.json'), `${prettyJson(stamp)}\n`);
  renameSync(tmp, dir);
  return { dir, created: true, bytes: bytes.byteLength, seconds: (performance.now() - t0) / 1000 };
}
