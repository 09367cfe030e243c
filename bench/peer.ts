/**
 * The generation peer of the `models` suite (issue 10, item 7): transformers.js
 * (@huggingface/transformers, onnxruntime-web's WebGPU execution provider) runs the same models on
 * the same cases in the same page, from ONNX exports of the same weights (tools/export_onnx.py,
 * written by the driver into bench/.models/onnx/<model id>/), in fp32 and fp16.
 *
 * Timed like the engine's own Generator (bench/models.ts), through the streamer that generate()
 * calls with the prompt before the first forward pass and with every new token after it:
 * - prefill: from the prompt's put() to the first token's, i.e. the prompt's forward pass, the
 *   logits read back and the greedy pick (the export has no num_logits_to_keep input, as optimum's
 *   exports of these architectures do not, so transformers.js reads logits for every position);
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
  PEER_DTYPES,
  type PeerDtype,
  type PeerLocation,
  promptIds,
} from './cases.js';
import { medianLow, type SuiteOptions, sample } from './models.js';

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
  await model.generate({
    inputs: ids,
    attention_mask: mask,
    max_new_tokens: newTokens,
    do_sample: false,
    eos_token_id: null,
    streamer,
    // generate() is typed for a TextStreamer, but only calls put() and end() (BaseStreamer's).
  } as unknown as Parameters<PreTrainedModel['generate']>[0]);
  if (streamer.ids.length !== newTokens)
    throw new Error(`transformers.js made ${streamer.ids.length} tokens, ${newTokens} asked`);
  return streamer;
}

async function benchPeerModel(
  device: GPUDevice,
  featureLevel: string,
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
    session_options: { executionProviders: [{ name: 'webgpu', device }] },
  });
  const loadMs = performance.now() - t0;
  try {
    // Compiles the kernels of both phases before anything is timed.
    o.status(`${engine} ${id}: warm-up`);
    await generate(model, promptIds({ ...(cases[0] as InferenceCase), prompt: 8 }), 2);
    for (const c of cases) {
      o.status(`${engine} ${c.key}`);
      try {
        const prompt = promptIds(c);
        let ids: number[] = [];
        const newTokens = c.kind === 'prefill' ? 1 : c.newTokens;
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
          shape: c.kind === 'prefill' ? `${id} T=${c.prompt}` : `${id} prompt=${c.prompt} new=${c.newTokens}`,
          ms,
          gflops: null,
          baseline: null,
          baselineMs: null,
          ratio: null,
          adapter: o.adapter,
          extra: {
            case: c.key,
            engine,
            tokens_per_s: ((c.kind === 'prefill' ? c.prompt : 1) * 1000) / ms,
            samples: samples.length,
            min_ms: Math.min(...samples),
            model_load_ms: loadMs,
            peer_adapter: describe(device, featureLevel),
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
  const adapter = await navigator.gpu.requestAdapter({ featureLevel, powerPreference: 'high-performance' });
  if (!adapter) throw new Error(`transformers.js: no ${featureLevel} adapter`);
  const requiredLimits: Record<string, number> = {};
  for (const key in adapter.limits) {
    const v = adapter.limits[key as keyof GPUSupportedLimits];
    if (typeof v === 'number') requiredLimits[key] = v;
  }
  return adapter.requestDevice({
    label: 'transformers.js',
    requiredFeatures: [...adapter.features] as GPUFeatureName[],
    requiredLimits,
  });
}

/** The adapter's names; a compatibility adapter under ANGLE gives none. */
function describe(device: GPUDevice, featureLevel: string): string {
  const info = device.adapterInfo;
  return [info.vendor, info.architecture, info.description].filter((x) => x).join(' ') || `${featureLevel} adapter`;
}

/** The models suite's cases again, through transformers.js, for each dtype. */
export async function runPeerBenchmarks(
  where: PeerLocation,
  featureLevel: 'core' | 'compatibility',
  o: SuiteOptions,
): Promise<void> {
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = where.models;
  env.useBrowserCache = false;
  env.useWasmCache = false;
  const onnx = env.backends.onnx as { wasm?: { wasmPaths?: unknown } };
  if (onnx.wasm) onnx.wasm.wasmPaths = { wasm: where.wasm, mjs: where.mjs };
  const cases = inferenceCases(o.quick).filter((c) => !o.only || c.key.includes(o.only));
  const device = await peerDevice(featureLevel);
  // transformers.js refuses fp16 on a device without shader-f16; that is no failure of the run.
  const dtypes = PEER_DTYPES.filter((d) => {
    if (d !== 'fp16' || device.features.has('shader-f16')) return true;
    o.status('transformers.js fp16 skipped: the adapter has no shader-f16');
    return false;
  });
  try {
    for (const [id, mine] of casesByModel(cases)) {
      for (const dtype of dtypes) {
        try {
          await benchPeerModel(device, featureLevel, id, dtype, mine, o);
        } catch (e) {
          for (const c of mine) o.fail(`transformers.js ${dtype} ${c.key}`, e);
        }
      }
    }
  } finally {
    device.destroy();
  }
}
