/**
 * The generation peer of the `models` suite (issue 10, item 7): transformers.js
 * (@huggingface/transformers, onnxruntime-web's WebGPU execution provider) runs the same models on
 * the same cases in the same page (under Node, bench/node.ts: onnxruntime-node's WebGPU provider in
 * the same process, runPeerBenchmarksNode), from ONNX exports of the same weights
 * (tools/export_onnx.py, written by the driver into bench/.models/onnx/<model id>/), in fp32 and
 * fp16.
 *
 * Timed like the engine's own Generator (bench/models.ts), through the streamer that generate()
 * calls with the prompt before the first forward pass and with every new token after it:
 * - prefill: from the prompt's put() to the first token's: the prompt's forward pass with the LM
 *   head on every position and all those logits read back, then the greedy pick. That is
 *   transformers.js as its users run it: optimum's exports of these architectures have no
 *   num_logits_to_keep input, and where one has, transformers.js passes 0 (all positions).
 *   webtune's prefill applies the head to the last position only (the driver's table says so);
 * - decode: from the first new token's put() to the last one's, per token.
 * Greedy, no stop token (eos_token_id: null), as the engine's cases run. Records are named
 * `prefill` / `decode` with extra.engine `transformers.js fp32|fp16` and the same extra.case as
 * the engine's record of that case, which the driver pairs them with. The page imports this module
 * only when the driver asks for the peer, so the other suites never load onnxruntime-web.
 */
import { AutoModelForCausalLM, BaseStreamer, env, type PreTrainedModel, Tensor } from '@huggingface/transformers';
import {
  type BenchModelId,
  casesByModel,
  type InferenceCase,
  inferenceCases,
  inferenceShape,
  inferenceTokensPerSecond,
  PEER_DTYPES,
  type PeerDtype,
  type PeerLocation,
  promptIds,
} from './cases.js';
import { medianLow, type SuiteOptions, sample, samplesField } from './models.js';

/** Times of the streamer's put() calls: the prompt's first, then one per new token. */
class Timestamps extends BaseStreamer {
  readonly at: number[] = [];
  readonly ids: number[] = [];
  override put(value: bigint[][]): void {
    this.at.push(performance.now());
    // The first call carries the prompt; later ones one new token each.
    if (this.at.length > 1) this.ids.push(Number(value[0]?.[0]));
  }
  override end(): void {}
}

async function generate(model: PreTrainedModel, prompt: readonly number[], newTokens: number): Promise<Timestamps> {
  const streamer = new Timestamps();
  const ids = new Tensor('int64', BigInt64Array.from(prompt, BigInt), [1, prompt.length]);
  const mask = new Tensor('int64', new BigInt64Array(prompt.length).fill(1n), [1, prompt.length]);
  const options: Parameters<PreTrainedModel['generate']>[0] = {
    inputs: ids,
    attention_mask: mask,
    max_new_tokens: newTokens,
    do_sample: false,
  };
  // Outside the literal, as the types do not allow them: no stop token (generate() tests
  // eos_token_id against null), as webtune's cases run; and a BaseStreamer, whose put() and end()
  // are all generate() calls, where GenerationConfig's type names a TextStreamer.
  Object.assign(options, { eos_token_id: null, streamer });
  await model.generate(options);
  if (streamer.ids.length !== newTokens)
    throw new Error(`transformers.js made ${streamer.ids.length} tokens, ${newTokens} asked`);
  return streamer;
}

/** Where transformers.js runs: its session options (none: its own default for 'webgpu') and the
 * adapter's name for the records. */
interface PeerRuntime {
  readonly sessionOptions?: Record<string, unknown>;
  readonly adapter: string;
}

async function benchPeerModel(
  runtime: PeerRuntime,
  id: BenchModelId,
  dtype: PeerDtype,
  cases: readonly InferenceCase[],
  o: SuiteOptions,
): Promise<void> {
  const engine = `transformers.js ${dtype}`;
  o.status(`${engine}: loading ${id}`);
  const t0 = performance.now();
  const model = await AutoModelForCausalLM.from_pretrained(id, {
    device: 'webgpu',
    dtype,
    ...(runtime.sessionOptions ? { session_options: runtime.sessionOptions } : {}),
  });
  const loadMs = performance.now() - t0;
  try {
    // Compiles what a short prompt and a decode step use before anything is timed (a longer
    // prompt may still compile some in its first sample, as webtune's may).
    o.status(`${engine} ${id}: warm-up`);
    await generate(model, promptIds({ ...(cases[0] as InferenceCase), prompt: 8 }), 2);
    for (const c of cases) {
      o.status(`${engine} ${c.key}`);
      try {
        const prompt = promptIds(c);
        let ids: number[] = [];
        const newTokens = c.kind === 'prefill' ? 1 : c.newTokens;
        if (c.kind === 'decode' && newTokens < 2) throw new Error('a decode case needs at least 2 new tokens');
        const samples = await sample(async () => {
          const s = await generate(model, prompt, newTokens);
          ids = s.ids;
          const at = s.at;
          return c.kind === 'prefill'
            ? (at[1] as number) - (at[0] as number)
            : ((at.at(-1) as number) - (at[1] as number)) / (newTokens - 1);
        }, c);
        const ms = medianLow(samples);
        o.report({
          name: c.kind,
          shape: inferenceShape(c),
          ms,
          gflops: null,
          baseline: null,
          baselineMs: null,
          ratio: null,
          adapter: o.adapter,
          extra: {
            case: c.key,
            engine,
            tokens_per_s: inferenceTokensPerSecond(c, ms),
            samples: samples.length,
            min_ms: Math.min(...samples),
            samples_ms: samplesField(samples),
            model_load_ms: loadMs,
            peer_adapter: runtime.adapter,
            ...(c.kind === 'decode' ? { ids: ids.join(',') } : {}),
          },
        });
      } catch (e) {
        o.fail(`${engine} ${c.key}`, e);
      }
    }
  } finally {
    await model.dispose();
  }
}

/**
 * A device for onnxruntime-web on the adapter webtune runs on. Left to itself it asks for a core
 * adapter, which is not always the page's (under Chromium's lavapipe flags webtune runs on the
 * compatibility adapter, and a core request gets SwiftShader). With every feature and the
 * adapter's own limits, so that no kernel of onnxruntime-web meets a default limit below them.
 */
async function peerDevice(featureLevel: 'core' | 'compatibility'): Promise<GPUDevice> {
  // The request webtune's context makes (createGpuContext: featureLevel only).
  const adapter = await navigator.gpu.requestAdapter({ featureLevel });
  if (!adapter) throw new Error(`transformers.js: no ${featureLevel} adapter`);
  const requiredLimits: Record<string, number> = {};
  for (const key in adapter.limits) {
    const v = adapter.limits[key as keyof GPUSupportedLimits];
    if (typeof v === 'number') requiredLimits[key] = v;
  }
  return adapter.requestDevice({
    label: 'transformers.js',
    // Not core-features-and-limits, which would make a compatibility device a core one.
    requiredFeatures: [...adapter.features].filter((f) => f !== 'core-features-and-limits') as GPUFeatureName[],
    requiredLimits,
  });
}

/** The adapter's names; a compatibility adapter under ANGLE gives none. */
function describe(device: GPUDevice, featureLevel: 'core' | 'compatibility'): string {
  const info = device.adapterInfo;
  return [info.vendor, info.architecture, info.description].filter((x) => x).join(' ') || `${featureLevel} adapter`;
}

/** The models suite's cases again, through transformers.js, for each dtype. */
export async function runPeerBenchmarks(
  where: PeerLocation,
  featureLevel: 'core' | 'compatibility',
  o: SuiteOptions,
): Promise<void> {
  env.useBrowserCache = false;
  env.useWasmCache = false;
  // Without these, onnxruntime-web fetches its WebAssembly from a CDN.
  if (!env.backends.onnx.wasm) throw new Error('transformers.js has no onnxruntime-web WebAssembly backend');
  env.backends.onnx.wasm.wasmPaths = { wasm: where.wasm, mjs: where.mjs };
  const device = await peerDevice(featureLevel);
  // fp16 needs shader-f16 on this device, and transformers.js also asks a default adapter of its
  // own for it (and refuses fp16 without), which is not always this one.
  const ownCheck = await navigator.gpu.requestAdapter();
  const fp16 =
    (device.features.has('shader-f16') && ownCheck?.features.has('shader-f16')) ||
    'no shader-f16 on the adapter (or on the one transformers.js checks)';
  const runtime = {
    sessionOptions: { executionProviders: [{ name: 'webgpu', device }] },
    adapter: describe(device, featureLevel),
  };
  try {
    await runPeerCases(runtime, where.models, where.ids, fp16, o);
  } finally {
    device.destroy();
  }
}

/**
 * The same under Node (bench/node.ts): transformers.js on onnxruntime-node's WebGPU
 * execution provider, which runs its own Dawn on the process's Vulkan driver (the one webtune's
 * `webgpu` package runs on; VK_ICD_FILENAMES picks it). `dir`: the exports' folder on disk. fp16
 * where webtune's adapter on that driver has shader-f16: onnxruntime-node does not say, and
 * transformers.js assumes it under Node.
 */
export async function runPeerBenchmarksNode(
  dir: string,
  ids: readonly BenchModelId[],
  shaderF16: boolean,
  o: SuiteOptions,
): Promise<void> {
  // onnxruntime-node does not say which adapter it took: the process's only Vulkan driver, which
  // the driver sets (VK_ICD_FILENAMES; with none it accepts, the provider fails to start).
  await runPeerCases(
    { adapter: "onnxruntime-node WebGPU (its own Dawn; the process's one Vulkan driver)" },
    dir,
    ids,
    shaderF16 || 'no shader-f16 on this driver',
    o,
  );
}

/** Every exported model's cases (the exports under `models`, a URL or a folder), for each dtype;
 * fp16 where `fp16` is true, else skipped with its reason. The peer is the measure, not the
 * subject: a case it cannot run is noted (it has no record) and does not fail the run. */
async function runPeerCases(
  runtime: PeerRuntime,
  models: string,
  ids: readonly BenchModelId[],
  fp16: true | string,
  o: SuiteOptions,
): Promise<void> {
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = models;
  if (fp16 !== true) o.status(`transformers.js fp16 skipped: ${fp16}`);
  const dtypes = PEER_DTYPES.filter((d) => d !== 'fp16' || fp16 === true);
  const cases = inferenceCases(o.quick, o.samples).filter((c) => !o.only || c.key.includes(o.only));
  const note = (key: string, e: unknown) =>
    o.status(`${key} could not run: ${e instanceof Error ? e.message : String(e)}`);
  const peerOptions: SuiteOptions = { ...o, fail: note };
  for (const [id, mine] of casesByModel(cases)) {
    if (!ids.includes(id)) continue; // its export failed: the driver said why
    for (const dtype of dtypes) {
      try {
        await benchPeerModel(runtime, id, dtype, mine, peerOptions);
      } catch (e) {
        for (const c of mine) note(`transformers.js ${dtype} ${c.key}`, e);
      }
    }
  }
}
