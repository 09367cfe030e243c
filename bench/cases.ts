/**
 * The cases of the `models` and `train` suites, shared by the page (which runs them on WebGPU)
 * and the Node driver (which hands the same list, with the same token ids, to
 * tools/bench_torch.py for the PyTorch CPU baseline and merges its figures by `key`).
 * Pure data and arithmetic: no DOM, no Node.
 */

export type BenchModelId = 'stories260K' | 'smollm2-135m-random';

export interface BenchModel {
  readonly id: BenchModelId;
  /** Hugging Face folder, relative to the repository root (served by Vite at the same path). */
  readonly dir: string;
  readonly vocab: number;
  readonly maxPositions: number;
  /** Shape figures for FLOP estimates. */
  readonly hidden: number;
  readonly intermediate: number;
  readonly layers: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
}

/** Where bench/bench_model.ts writes the random SmolLM2-135M-shaped model (gitignored). */
export const GENERATED_MODELS_DIR = 'bench/.models';

export const BENCH_MODELS: Readonly<Record<BenchModelId, BenchModel>> = {
  stories260K: {
    id: 'stories260K',
    dir: 'apps/studio/public/models/stories260K',
    vocab: 512,
    maxPositions: 512,
    hidden: 64,
    intermediate: 172,
    layers: 5,
    heads: 8,
    kvHeads: 4,
    headDim: 8,
  },
  'smollm2-135m-random': {
    id: 'smollm2-135m-random',
    dir: `${GENERATED_MODELS_DIR}/smollm2-135m-random`,
    vocab: 49152,
    maxPositions: 2048,
    hidden: 576,
    intermediate: 1536,
    layers: 30,
    heads: 9,
    kvHeads: 3,
    headDim: 64,
  },
};

/** The `shape` of an inference case's records, the engine's and the peer's alike. */
export function inferenceShape(c: InferenceCase): string {
  return c.kind === 'prefill' ? `${c.model} T=${c.prompt}` : `${c.model} prompt=${c.prompt} new=${c.newTokens}`;
}

/** Tokens/s of an inference case from its milliseconds: prompt tokens for a prefill, one per
 * decode step. */
export function inferenceTokensPerSecond(c: InferenceCase, ms: number): number {
  return ((c.kind === 'prefill' ? c.prompt : 1) * 1000) / ms;
}

/** The generation peer's precisions (bench/peer.ts: transformers.js, fp32 and fp16 ONNX exports). */
export const PEER_DTYPES = ['fp32', 'fp16'] as const;
export type PeerDtype = (typeof PEER_DTYPES)[number];

/** Where the driver put what the peer needs in the page (bench/peer_export.ts). */
export interface PeerLocation {
  /** The bench models that have an export (the others run without the peer). */
  readonly ids: readonly BenchModelId[];
  /** URL of the folder holding one ONNX export per bench model id. */
  readonly models: string;
  /** URLs of onnxruntime-web's WebAssembly module and its loader, served from node_modules. */
  readonly wasm: string;
  readonly mjs: string;
}

/** Prefill: the prompt's forward pass up to the last position's logits (no sampling).
 * Decode: `newTokens` greedy tokens after a prompt; timed per token after the prefill. */
export interface InferenceCase {
  readonly key: string;
  readonly kind: 'prefill' | 'decode';
  readonly model: BenchModelId;
  readonly prompt: number;
  /** Decode only. */
  readonly newTokens: number;
  /** Timed repetitions: at least `minSamples`, more while `budgetMs` lasts, at most `maxSamples`. */
  readonly minSamples: number;
  readonly maxSamples: number;
  readonly budgetMs: number;
}

/** How the frozen weights are held on the GPU (loadModel's precision). */
export type BenchPrecision = 'f16' | 'q8_0' | 'q4_0';

export interface TrainCase {
  readonly key: string;
  readonly model: BenchModelId;
  /** The frozen base's precision: f16, or QLoRA's block formats side by side with it. */
  readonly precision: BenchPrecision;
  readonly r: number;
  readonly alpha: number;
  /** PEFT target_modules. */
  readonly targets: readonly string[] | 'all-linear';
  readonly batch: number;
  readonly seq: number;
  /** Untimed steps first (the first step pays for lazy driver work). */
  readonly warmupSteps: number;
  readonly minSteps: number;
  readonly maxSteps: number;
  readonly budgetMs: number;
}

/** Hyperparameters both sides use (the figures do not depend on them). */
export const TRAIN_HYPER = { lr: 1e-4, weightDecay: 0.01, maxGradNorm: 1.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 };

/** A prompt that fits: stories260K's context is 512, so its "512" prompt is 511 tokens (the
 * generation session's cache must hold the prompt plus one position). */
function promptFor(model: BenchModelId, n: number, newTokens = 1): number {
  return Math.min(n, BENCH_MODELS[model].maxPositions - newTokens);
}

/**
 * Full: prompts of 128 and 512 tokens, 64 greedy tokens after a 128-token prompt (16 on the
 * 135M shape, whose decode steps take seconds each on software drivers). Quick: short prompts and
 * a few tokens, one sample on the 135M shape: a smoke test, not figures to compare. `samples`
 * (`--samples N`): exactly N timed repetitions of every case, whatever they take, on each engine.
 */
export function inferenceCases(quick: boolean, samples?: number): InferenceCase[] {
  const cases = defaultInferenceCases(quick);
  if (samples === undefined) return cases;
  return cases.map((c) => ({ ...c, minSamples: samples, maxSamples: samples, budgetMs: 0 }));
}

function defaultInferenceCases(quick: boolean): InferenceCase[] {
  const out: InferenceCase[] = [];
  const models: BenchModelId[] = ['stories260K', 'smollm2-135m-random'];
  for (const model of models) {
    const big = model !== 'stories260K';
    const timing = big
      ? { minSamples: 1, maxSamples: quick ? 1 : 2, budgetMs: quick ? 0 : 60_000 }
      : { minSamples: 2, maxSamples: 7, budgetMs: quick ? 3_000 : 10_000 };
    for (const p of quick ? [big ? 16 : 32] : [128, 512]) {
      const prompt = promptFor(model, p);
      out.push({ key: `prefill ${model} T=${prompt}`, kind: 'prefill', model, prompt, newTokens: 1, ...timing });
    }
    const prompt = quick ? (big ? 16 : 32) : 128;
    const newTokens = quick ? (big ? 3 : 16) : big ? 16 : 64;
    out.push({
      key: `decode ${model} prompt=${prompt} new=${newTokens}`,
      kind: 'decode',
      model,
      prompt,
      newTokens,
      ...(big ? { ...timing, maxSamples: 1 } : { ...timing, minSamples: 1, maxSamples: 5 }),
    });
  }
  return out;
}

function trainCase(
  model: BenchModelId,
  r: number,
  targets: readonly string[] | 'all-linear',
  batch: number,
  seq: number,
  timing: Pick<TrainCase, 'warmupSteps' | 'minSteps' | 'maxSteps' | 'budgetMs'>,
  precision: BenchPrecision = 'f16',
): TrainCase {
  const t = targets === 'all-linear' ? 'all-linear' : targets.join(',');
  return {
    key: `train ${model}${precision === 'f16' ? '' : ` ${precision}`} r=${r} ${t} B=${batch} T=${seq}`,
    model,
    precision,
    r,
    alpha: 2 * r,
    targets,
    batch,
    seq,
    ...timing,
  };
}

/**
 * Full: r = 8 and 16 on q_proj,v_proj and r = 8 all-linear, 4 × 128, on stories260K; on the 135M
 * shape r = 8 and 16 (q_proj,v_proj) at 4 × 128 and r = 8 at 1 × 512, one timed step each and no
 * warm-up step (a step takes many minutes on SwiftShader; its pipelines are compiled when the
 * trainer is created, and a first step measured as long as the second); r = 8 q_proj,v_proj at
 * 4 × 128 again over q8_0 and q4_0 bases on both models. Quick: one small case per model, and
 * stories260K's over a q4_0 base.
 */
export function trainCases(quick: boolean): TrainCase[] {
  const qv = ['q_proj', 'v_proj'];
  const big = { warmupSteps: 0, minSteps: 1, maxSteps: 1, budgetMs: 0 };
  if (quick) {
    const quickSmall = { warmupSteps: 1, minSteps: 2, maxSteps: 5, budgetMs: 3_000 };
    return [
      trainCase('stories260K', 8, qv, 2, 32, quickSmall),
      trainCase('stories260K', 8, qv, 2, 32, quickSmall, 'q4_0'),
      trainCase('smollm2-135m-random', 8, qv, 1, 16, big),
    ];
  }
  const small = { warmupSteps: 1, minSteps: 3, maxSteps: 10, budgetMs: 15_000 };
  return [
    trainCase('stories260K', 8, qv, 4, 128, small),
    trainCase('stories260K', 16, qv, 4, 128, small),
    trainCase('stories260K', 8, 'all-linear', 4, 128, small),
    // The same step over a quantized frozen base (QLoRA): tokens/s and GPU bytes beside f16.
    trainCase('stories260K', 8, qv, 4, 128, small, 'q8_0'),
    trainCase('stories260K', 8, qv, 4, 128, small, 'q4_0'),
    trainCase('smollm2-135m-random', 8, qv, 4, 128, big),
    trainCase('smollm2-135m-random', 8, 'all-linear', 4, 128, big),
    trainCase('smollm2-135m-random', 8, qv, 4, 128, big, 'q8_0'),
    trainCase('smollm2-135m-random', 8, qv, 4, 128, big, 'q4_0'),
    trainCase('smollm2-135m-random', 16, qv, 4, 128, big),
    trainCase('smollm2-135m-random', 8, qv, 1, 512, big),
  ];
}

/** The cases grouped by model (each model is loaded once for its cases), models without cases left out. */
export function casesByModel<C extends { readonly model: BenchModelId }>(cases: readonly C[]): [BenchModelId, C[]][] {
  return (Object.keys(BENCH_MODELS) as BenchModelId[])
    .map((id): [BenchModelId, C[]] => [id, cases.filter((c) => c.model === id)])
    .filter(([, mine]) => mine.length > 0);
}

/** Fixed pseudo-random token ids in [3, vocab) (past BOS/EOS/UNK-like low ids), the same on both
 * sides of the comparison. */
export function benchTokenIds(count: number, vocab: number, seed: number): number[] {
  const out: number[] = [];
  let s = (seed ^ 0x9e3779b9) >>> 0;
  for (let i = 0; i < count; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out.push(3 + (Math.floor((s / 4294967296) * (vocab - 3)) % (vocab - 3)));
  }
  return out;
}

export function promptIds(c: InferenceCase): number[] {
  return benchTokenIds(c.prompt, BENCH_MODELS[c.model].vocab, 1000 + c.prompt);
}

/** [batch·seq] ids of the (single, repeated) training batch; labels are the ids themselves. */
export function trainIds(c: TrainCase): number[] {
  return benchTokenIds(c.batch * c.seq, BENCH_MODELS[c.model].vocab, 2000 + c.batch * c.seq);
}

/** FLOPs of the linear layers (q, k, v, o, gate, up, down) for one token. */
function linearFlopsPerToken(m: BenchModel): number {
  const q = m.heads * m.headDim;
  const kv = m.kvHeads * m.headDim;
  return m.layers * 2 * (m.hidden * q + 2 * m.hidden * kv + q * m.hidden + 3 * m.hidden * m.intermediate);
}

/** Prefill of T tokens: the linears for every token, causal attention (QKᵀ and PV over the
 * T(T+1)/2 visible pairs), and the LM head for the last position only. */
export function prefillFlops(m: BenchModel, T: number): number {
  const attention = m.layers * 4 * m.heads * m.headDim * ((T * (T + 1)) / 2);
  return linearFlopsPerToken(m) * T + attention + 2 * m.hidden * m.vocab;
}

/** One decode step at position `pos` (pos earlier tokens in the cache): linears, attention over
 * pos + 1 keys, LM head. */
export function decodeStepFlops(m: BenchModel, pos: number): number {
  return linearFlopsPerToken(m) + m.layers * 4 * m.heads * m.headDim * (pos + 1) + 2 * m.hidden * m.vocab;
}
