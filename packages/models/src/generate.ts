/**
 * Text generation with a KV cache, one sequence at a time. The cache and the one-token decode
 * step are planned once per session; each token then only rewrites a position, an id and the
 * attention's key count, submits once, and reads back one row of logits.
 *
 * The prompt is run as a prefill whose k and v projections write straight into the cache;
 * decode steps write the new token's k and v into the cache at the position the GPU reads from
 * a buffer (copy_rows), so the planned dispatches never change.
 */
import {
  attentionUniforms,
  createTensor,
  type Dispatch,
  diffCounters,
  fusedQkvLayout,
  type GpuContext,
  type GpuCounters,
  inferenceTileMath,
  kvCacheLayout,
  planCopyRows,
  planEmbeddingTable,
  planTableProduct,
  readFloat32,
  ShapeError,
  StepEncoder,
  type Tensor,
  type TileMath,
  tensorView,
  WebtuneError,
  writeTensor,
} from '@webtune/core';
import {
  Allocator,
  type AttentionBlock,
  allocateLayer,
  type LoraWeightsByModule,
  normStats,
  planLayer,
  planNorm,
  type QkvDestination,
} from './forward.js';
import type { CausalLM, Layer } from './model.js';
import { type SamplingOptions, sampleToken, seededRandom } from './sampling.js';

export class GenerationCancelled extends WebtuneError {
  constructor() {
    super('generation was cancelled');
  }
}

export interface GeneratorOptions {
  /** Longest prompt + generation the KV cache holds (default and at most the model's maximum). */
  readonly maxSequence?: number;
  /** An adapter applied unmerged (its LoRA term in every adapted projection). */
  readonly lora?: LoraWeightsByModule;
  /**
   * 'f16' stages and multiplies the tiled products of weights stored below f32 (the prefill's
   * projections) and the tiled attention in f16 with f32 accumulation (planForward's tileMath;
   * needs shader-f16). The decode step's matrix-vector products stay f32. Default
   * inferenceTileMath(ctx) ('f16' on GPUs with shader-f16, else 'f32'), and 'f32' for a model
   * loaded with f32 weights: whoever asks for f32 weights asks for f32 arithmetic.
   */
  readonly tileMath?: TileMath;
}

export interface GenerateOptions extends SamplingOptions {
  readonly maxNewTokens: number;
  /** Seed for sampling (ignored when greedy). Default 0. */
  readonly seed?: number;
  /** Token ids that end generation (default: the model's EOS ids). They are not returned. */
  readonly stopTokens?: readonly number[];
  /** Called with each new token as soon as it is chosen. */
  readonly onToken?: (id: number) => void;
  readonly signal?: AbortSignal;
}

export interface GenerateResult {
  readonly ids: number[];
  readonly stopReason: 'stop-token' | 'max-new-tokens' | 'context-full';
  /** Seconds spent in the prompt's prefill and in the decode steps. */
  readonly prefillSeconds: number;
  readonly decodeSeconds: number;
  /** Decode steps run (one per token after the first; the prefill gives the first logits). */
  readonly decodeSteps: number;
  /** What the prefill and the decode steps asked of the GPU (exact runtime counts). */
  readonly prefillCounters: GpuCounters;
  readonly decodeCounters: GpuCounters;
}

interface Cache {
  /** Llama family: k and v per layer [maxT, nKV·hd]; GPT-2: the fused qkv rows [maxT, 3d]. */
  readonly k: Tensor[];
  readonly v: Tensor[];
  readonly qkv: Tensor[];
}

interface DecodePlan {
  readonly ids: Tensor;
  readonly positions: Tensor;
  readonly logits: Tensor;
  readonly errors: Tensor;
  readonly dispatches: Dispatch[];
  /** Each layer's attention dispatches, moved to the current position before each step. */
  readonly attention: Dispatch[][];
  readonly owned: Tensor[];
}

export class Generator {
  private released = false;

  private constructor(
    readonly ctx: GpuContext,
    readonly model: CausalLM,
    /** Longest prompt + generation this session's cache holds. */
    readonly maxSequence: number,
    private readonly cache: Cache,
    private readonly decode: DecodePlan,
    private readonly lora: LoraWeightsByModule | undefined,
    /** The tiled products' and the attention's math (GeneratorOptions.tileMath). */
    readonly tileMath: TileMath,
  ) {}

  static async create(ctx: GpuContext, model: CausalLM, opts: GeneratorOptions = {}): Promise<Generator> {
    const c = model.config;
    const maxSequence = Math.min(opts.maxSequence ?? c.maxPositions, c.maxPositions);
    const cache: Cache = { k: [], v: [], qkv: [] };
    const owned: Tensor[] = [];
    try {
      for (let l = 0; l < c.numLayers; l++) {
        if (c.family === 'gpt2')
          cache.qkv.push(createTensor(ctx, [maxSequence, 3 * c.hiddenSize], 'f32', `kv_cache.${l}.qkv`));
        else {
          cache.k.push(createTensor(ctx, [maxSequence, c.numKvHeads * c.headDim], 'f32', `kv_cache.${l}.k`));
          cache.v.push(createTensor(ctx, [maxSequence, c.numKvHeads * c.headDim], 'f32', `kv_cache.${l}.v`));
        }
      }
      owned.push(...cache.k, ...cache.v, ...cache.qkv);
      const tileMath = opts.tileMath ?? (model.precision === 'f32' ? 'f32' : inferenceTileMath(ctx));
      if (tileMath === 'f16' && !ctx.features.shaderF16) {
        throw new ShapeError('generate: f16 tile math needs an adapter with shader-f16, and this one has none');
      }
      const decode = await planDecode(ctx, model, cache, maxSequence, opts.lora, tileMath);
      return new Generator(ctx, model, maxSequence, cache, decode, opts.lora, tileMath);
    } catch (e) {
      for (const t of owned) t.dispose();
      throw e;
    }
  }

  /** The decode step's planned dispatches, in order (to inspect: their kernels, their count). */
  get decodeDispatches(): readonly Dispatch[] {
    return this.decode.dispatches;
  }

  /** Bytes of the KV cache. */
  get cacheBytes(): number {
    return [...this.cache.k, ...this.cache.v, ...this.cache.qkv].reduce((n, t) => n + t.byteLength, 0);
  }

  /** Generates after `prompt` (token ids, at least one). */
  async generate(prompt: readonly number[], opts: GenerateOptions): Promise<GenerateResult> {
    if (this.released) throw new WebtuneError('generator was disposed');
    const c = this.model.config;
    if (prompt.length === 0) throw new ShapeError('generate: the prompt needs at least one token (a BOS, say)');
    for (const id of prompt) {
      if (!Number.isSafeInteger(id) || id < 0 || id >= c.vocabSize)
        throw new ShapeError(`generate: token id ${id} is outside the vocabulary (${c.vocabSize})`);
    }
    if (prompt.length >= this.maxSequence) {
      throw new ShapeError(`generate: the prompt has ${prompt.length} tokens; this session holds ${this.maxSequence}`);
    }
    const stop = new Set(opts.stopTokens ?? c.eosTokenIds);
    const random = seededRandom(opts.seed ?? 0);
    const out: number[] = [];
    const c0 = this.ctx.counters;
    const t0 = performance.now();
    let logits = await this.prefill(prompt);
    const t1 = performance.now();
    const c1 = this.ctx.counters;
    let pos = prompt.length;
    let decodeSteps = 0;
    let stopReason: GenerateResult['stopReason'] = 'max-new-tokens';
    while (out.length < opts.maxNewTokens) {
      if (opts.signal?.aborted) throw new GenerationCancelled();
      const next = sampleToken(logits, opts, random);
      if (stop.has(next)) {
        stopReason = 'stop-token';
        break;
      }
      out.push(next);
      opts.onToken?.(next);
      if (out.length >= opts.maxNewTokens) break;
      if (pos >= this.maxSequence) {
        stopReason = 'context-full';
        break;
      }
      logits = await this.step(next, pos);
      pos++;
      decodeSteps++;
    }
    return {
      ids: out,
      stopReason,
      prefillSeconds: (t1 - t0) / 1000,
      decodeSeconds: (performance.now() - t1) / 1000,
      decodeSteps,
      prefillCounters: diffCounters(c0, c1),
      decodeCounters: diffCounters(c1, this.ctx.counters),
    };
  }

  /** Runs the prompt, filling the cache rows [0, T); returns the last position's logits. */
  private async prefill(prompt: readonly number[]): Promise<Float32Array> {
    const plan = await planPrefill(this.ctx, this.model, this.cache, prompt.length, this.lora, this.tileMath);
    try {
      writeTensor(plan.ids, prompt);
      writeTensor(plan.zero, [0]);
      new StepEncoder(this.ctx, 'prefill')
        .clear(plan.errors)
        .dispatch(...plan.dispatches)
        .submit();
      return await readFloat32(plan.logits);
    } finally {
      plan.dispose();
    }
  }

  /** Feeds `token` at position `pos` (its k and v join the cache); returns the next logits. */
  private async step(token: number, pos: number): Promise<Float32Array> {
    const c = this.model.config;
    const d = this.decode;
    writeTensor(d.ids, [token]);
    writeTensor(d.positions, [pos]);
    const dims = {
      B: 1,
      Tq: 1,
      Tk: pos + 1,
      pos0: pos,
      nH: c.numHeads,
      nKV: c.numKvHeads,
      hd: c.headDim,
      ...decodeLayouts(this.model, this.maxSequence),
    };
    const uniforms = attentionUniforms(dims);
    for (const layer of d.attention) for (const dsp of layer) dsp.setUniforms(uniforms);
    new StepEncoder(this.ctx, `decode ${pos}`).dispatch(...d.dispatches).submit();
    return readFloat32(d.logits);
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    for (const dsp of this.decode.dispatches) dsp.dispose();
    for (const t of this.decode.owned) t.dispose();
    for (const t of [...this.cache.k, ...this.cache.v, ...this.cache.qkv]) t.dispose();
  }
}

/** Attention layouts for reading the cache (and, for GPT-2, q from the fused row). */
function decodeLayouts(model: CausalLM, maxT: number) {
  const c = model.config;
  if (c.family === 'gpt2') {
    const f = fusedQkvLayout({ T: maxT, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim });
    return { q: { ...f.q, batchStride: f.q.rowStride }, k: f.k, v: f.v };
  }
  const kv = kvCacheLayout({ maxT, nKV: c.numKvHeads, hd: c.headDim });
  return { k: kv, v: kv };
}

interface PrefillPlan {
  ids: Tensor;
  zero: Tensor;
  errors: Tensor;
  logits: Tensor;
  dispatches: Dispatch[];
  dispose(): void;
}

async function planPrefill(
  ctx: GpuContext,
  model: CausalLM,
  cache: Cache,
  T: number,
  lora: LoraWeightsByModule | undefined,
  tileMath: TileMath,
): Promise<PrefillPlan> {
  const c = model.config;
  const d = c.hiddenSize;
  const alloc = new Allocator(ctx, 'prefill');
  const dispatches: Dispatch[] = [];
  const views: Tensor[] = [];
  const dispose = () => {
    for (const x of dispatches) x.dispose();
    for (const v of views) v.dispose();
    for (const t of alloc.owned) t.dispose();
  };
  try {
    const ids = alloc.of([T], 'i32', 'ids');
    const zero = alloc.of([1], 'i32', 'zero');
    const errors = alloc.of([2], 'u32', 'embedding_errors');
    // The residual stream, updated in place by every layer.
    const x0 = alloc.f32([T, d], 'embedded');
    dispatches.push(
      ...(await planEmbeddingTable(
        ctx,
        { ids, table: model.embed, wpe: model.positions, out: x0, errors },
        { T, label: 'embedding' },
      )),
    );
    const kvDim = c.numKvHeads * c.headDim;
    // The projections write the cache's first T rows directly (views at offset 0).
    const kView = cache.k.map((t, l) => tensorView(t, 0, [T, kvDim], 'f32', `kv_cache.${l}.k[0:${T}]`));
    const vView = cache.v.map((t, l) => tensorView(t, 0, [T, kvDim], 'f32', `kv_cache.${l}.v[0:${T}]`));
    const qkvView = cache.qkv.map((t, l) => tensorView(t, 0, [T, 3 * d], 'f32', `kv_cache.${l}.qkv[0:${T}]`));
    views.push(...kView, ...vView, ...qkvView);
    const base = { B: 1, Tq: T, Tk: T, pos0: 0, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim };
    const attention: AttentionBlock = {
      positions: { T, pos0: 0 },
      dest: (a, l): QkvDestination =>
        c.family === 'gpt2'
          ? { qkv: qkvView[l] as Tensor }
          : { q: a.q as Tensor, k: kView[l] as Tensor, v: vView[l] as Tensor },
      attend: (_a, _l, dest) =>
        'qkv' in dest
          ? {
              q: dest.qkv,
              k: dest.qkv,
              v: dest.qkv,
              dims: { ...base, ...fusedQkvLayout({ T, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim }) },
            }
          : { q: dest.q, k: dest.k, v: dest.v, dims: base },
    };
    const pool = new Map<string, Tensor>();
    for (let i = 0; i < c.numLayers; i++) {
      const acts = allocateLayer(alloc, model, T, 1, T, i, x0, lora, pool);
      const layer = model.layers[i] as Layer;
      dispatches.push(...(await planLayer(ctx, model, layer, acts, attention, lora, undefined, true, tileMath)));
    }
    const x = x0;
    const hidden = alloc.f32([T, d], 'hidden');
    dispatches.push(
      await planNorm(
        ctx,
        model,
        model.finalNorm,
        x,
        hidden,
        normStats(alloc, T, c.norm.kind === 'layer', 'final_norm'),
        'final_norm',
      ),
    );
    // Only the last position's logits are needed: copy its row out, then one [1, V] product.
    const last = alloc.f32([1, d], 'last_hidden');
    dispatches.push(
      await planCopyRows(ctx, hidden, zero, last, { rows: 1, cols: d, srcOffset: (T - 1) * d }, 0, 'last_row'),
    );
    const logits = alloc.f32([1, c.vocabSize], 'logits');
    dispatches.push(...(await planTableProduct(ctx, last, model.lmHead, logits, 'lm_head', alloc.owned)));
    return { ids, zero, errors, logits, dispatches, dispose };
  } catch (e) {
    dispose();
    throw e;
  }
}

async function planDecode(
  ctx: GpuContext,
  model: CausalLM,
  cache: Cache,
  maxT: number,
  lora: LoraWeightsByModule | undefined,
  tileMath: TileMath,
): Promise<DecodePlan> {
  const c = model.config;
  const d = c.hiddenSize;
  const alloc = new Allocator(ctx, 'decode');
  const dispatches: Dispatch[] = [];
  const attentionDispatches: Dispatch[][] = [];
  try {
    const ids = alloc.of([1], 'i32', 'ids');
    const positions = alloc.of([1], 'i32', 'position');
    const errors = alloc.of([2], 'u32', 'embedding_errors');
    // The residual stream, updated in place by every layer.
    const x0 = alloc.f32([1, d], 'embedded');
    dispatches.push(
      ...(await planEmbeddingTable(
        ctx,
        { ids, table: model.embed, wpe: model.positions, positions, out: x0, errors },
        { T: 1, label: 'embedding' },
      )),
    );
    const kvDim = c.numKvHeads * c.headDim;
    const layouts = decodeLayouts(model, maxT);
    // Planned for the largest position; each step rewrites pos0 and Tk (Generator.step).
    const dims = {
      B: 1,
      Tq: 1,
      Tk: maxT,
      pos0: maxT - 1,
      nH: c.numHeads,
      nKV: c.numKvHeads,
      hd: c.headDim,
      ...layouts,
    };
    const attention: AttentionBlock = {
      positions: { T: 1, positions },
      dest: (a): QkvDestination =>
        c.family === 'gpt2' ? { qkv: a.qkv as Tensor } : { q: a.q as Tensor, k: a.k as Tensor, v: a.v as Tensor },
      kvCache:
        c.family === 'gpt2'
          ? undefined
          : { k: (l) => cache.k[l] as Tensor, v: (l) => cache.v[l] as Tensor, maxRow: maxT - 1 },
      afterProjections: async (a, l) => {
        const write = (src: Tensor, dst: Tensor, cols: number, name: string) =>
          planCopyRows(ctx, src, positions, dst, { rows: 1, cols }, maxT - 1, `layer${l}.cache_${name}`);
        return c.family === 'gpt2'
          ? [await write(a.qkv as Tensor, cache.qkv[l] as Tensor, 3 * d, 'qkv')]
          : [
              await write(a.k as Tensor, cache.k[l] as Tensor, kvDim, 'k'),
              await write(a.v as Tensor, cache.v[l] as Tensor, kvDim, 'v'),
            ];
      },
      attend: (a, l) =>
        c.family === 'gpt2'
          ? { q: a.qkv as Tensor, k: cache.qkv[l] as Tensor, v: cache.qkv[l] as Tensor, dims }
          : { q: a.q as Tensor, k: cache.k[l] as Tensor, v: cache.v[l] as Tensor, dims },
      onPlanned: (l, planned) => {
        attentionDispatches[l] = [...planned];
      },
    };
    const pool = new Map<string, Tensor>();
    for (let i = 0; i < c.numLayers; i++) {
      const acts = allocateLayer(alloc, model, 1, 1, 1, i, x0, lora, pool);
      const layer = model.layers[i] as Layer;
      dispatches.push(...(await planLayer(ctx, model, layer, acts, attention, lora, undefined, true, tileMath)));
    }
    const x = x0;
    const hidden = alloc.f32([1, d], 'hidden');
    dispatches.push(
      await planNorm(
        ctx,
        model,
        model.finalNorm,
        x,
        hidden,
        normStats(alloc, 1, c.norm.kind === 'layer', 'final_norm'),
        'final_norm',
      ),
    );
    const logits = alloc.f32([1, c.vocabSize], 'logits');
    dispatches.push(...(await planTableProduct(ctx, hidden, model.lmHead, logits, 'lm_head', alloc.owned)));
    return { ids, positions, logits, errors, dispatches, attention: attentionDispatches, owned: alloc.owned };
  } catch (e) {
    for (const x of dispatches) x.dispose();
    for (const t of alloc.owned) t.dispose();
    throw e;
  }
}
