/**
 * Which kernel configurations suit an adapter: 'gpu' (wide workgroups, tiles staged in workgroup
 * memory, tree reductions) or 'cpu' (narrow workgroups and few barriers, for drivers that run
 * every invocation of a workgroup as a coroutine on the CPU: SwiftShader, lavapipe).
 *
 * Decided from what the adapter says about itself when it says anything (a fallback adapter, or a
 * software driver's name, is 'cpu'; any other name is 'gpu'), and measured when it says nothing,
 * as a compatibility-mode adapter may not: a real GPU in compatibility mode must still get the
 * GPU kernels. The measurement times about 134 M multiply-adds staged through workgroup memory
 * (shaders/probe_throughput.wgsl) against the same dispatch without the work: a few milliseconds
 * on any GPU, tens on lavapipe and hundreds on SwiftShader. (Barriers alone do not tell them
 * apart: lavapipe runs a workgroup's invocations in SIMD lanes and crosses a barrier cheaply.)
 */
import source from '../../../shaders/probe_throughput.wgsl?raw';
import { matmulStagingProbe } from './kernels/matmul.js';

export type KernelProfile = 'gpu' | 'cpu';

/**
 * How the tiled matmuls read their operands: staged through workgroup memory ('workgroup': GPUs,
 * SwiftShader) or straight from the buffers ('direct', matmul.wgsl's DIRECT: lavapipe). GPU
 * profiles always stage; CPU profiles take stagingFromInfo's answer where the adapter names its
 * driver, and measure (measureMatmulStaging) where it names nothing.
 */
export type MatmulStaging = 'workgroup' | 'direct';

/**
 * The staging a named CPU driver gets, from `pnpm bench --suite kernels --only matmul_direct`
 * (2026-12-07, Chromium, paired median ratios staged ms / direct ms on the matmul bench's products
 * of d = 576 to 2048): lavapipe 1.07–1.44 (10 rounds), SwiftShader 0.72–1.00 (6 rounds). Undefined
 * for any other adapter: measured if CPU-backed.
 */
export function stagingFromInfo(a: AdapterIdentity): MatmulStaging | undefined {
  const name = `${a.vendor} ${a.architecture} ${a.device} ${a.description}`;
  if (/llvmpipe|lavapipe/i.test(name)) return 'direct';
  if (/swiftshader/i.test(name)) return 'workgroup';
  return undefined;
}

/** How the profile was chosen: asked for by the caller, read from the adapter's info, or measured. */
export type KernelProfileSource = 'forced' | 'adapter info' | 'measured';

/** What the adapter reports about itself (GPUAdapterInfo, flattened). */
export interface AdapterIdentity {
  readonly vendor: string;
  readonly architecture: string;
  readonly device: string;
  readonly description: string;
  readonly isFallbackAdapter: boolean;
}

const SOFTWARE = /swiftshader|llvmpipe|lavapipe|softpipe|warp|microsoft basic render/i;

/** The profile the adapter's info implies, or undefined when it names nothing. */
export function profileFromInfo(a: AdapterIdentity): KernelProfile | undefined {
  const name = `${a.vendor} ${a.architecture} ${a.device} ${a.description}`;
  if (a.isFallbackAdapter || SOFTWARE.test(name)) return 'cpu';
  return name.trim() ? 'gpu' : undefined;
}

/** Workgroups of the probe, and rounds of its timed variant (16 multiply-adds each). */
const WORKGROUPS = 1024;
const ROUNDS = 128;
/** Extra milliseconds the work may take before the adapter counts as CPU-backed: 134 M
 * multiply-adds take under 3 ms at 100 GFLOP/s, a slow integrated GPU's rate. */
const CPU_THRESHOLD_MS = 10;
/** The probe times pairs (without the work, then with it) and keeps the fastest of each: a
 * dispatch can wait behind other work of the same GPU process (another tab, another test file),
 * which inflates either timing, and only the fastest show the adapter. It stops once the fastest
 * empty dispatch is quick enough to show that some pair ran unhindered, or after MAX_PAIRS. */
const MIN_PAIRS = 2;
const MAX_PAIRS = 8;
const QUIET_MS = CPU_THRESHOLD_MS / 2;

export interface ProfileMeasurement {
  readonly profile: KernelProfile;
  /** Milliseconds of the probe with and without its work (the fastest of `pairs` runs each). */
  readonly workMs: number;
  readonly plainMs: number;
  readonly pairs: number;
}

/** Times the probe on `device` (a few dispatches; its buffers are destroyed before it returns). */
export async function measureKernelProfile(device: GPUDevice): Promise<ProfileMeasurement> {
  const module = device.createShaderModule({ label: 'probe_throughput', code: source });
  const out = device.createBuffer({
    label: 'probe_throughput.out',
    size: WORKGROUPS * 64 * 4,
    usage: GPUBufferUsage.STORAGE,
  });
  try {
    const prepare = (rounds: number) =>
      dispatchTimer(device, module, `probe_throughput ${rounds}`, 'main', { ROUNDS: rounds }, [out], [WORKGROUPS, 1]);
    const plain = await prepare(0);
    const work = await prepare(ROUNDS);
    let plainMs = Number.POSITIVE_INFINITY;
    let workMs = Number.POSITIVE_INFINITY;
    let pairs = 0;
    // A verdict of 'cpu' takes a third pair: two work dispatches held up behind other work would
    // otherwise make a GPU look CPU-backed.
    const cpu = () => workMs - plainMs > CPU_THRESHOLD_MS;
    while (pairs < MAX_PAIRS && (pairs < MIN_PAIRS || plainMs > QUIET_MS || (cpu() && pairs < 3))) {
      plainMs = Math.min(plainMs, await plain());
      workMs = Math.min(workMs, await work());
      pairs++;
    }
    return { profile: cpu() ? 'cpu' : 'gpu', workMs, plainMs, pairs };
  } finally {
    out.destroy();
  }
}

/** A timer of one dispatch of `entryPoint` over `buffers` (bindings 0.. in order): each call
 * submits it alone and returns the milliseconds until the queue reports it done. */
async function dispatchTimer(
  device: GPUDevice,
  module: GPUShaderModule,
  label: string,
  entryPoint: string,
  constants: Readonly<Record<string, number | boolean>>,
  buffers: readonly GPUBuffer[],
  workgroups: readonly [number, number],
): Promise<() => Promise<number>> {
  const pipeline = await device.createComputePipelineAsync({
    label,
    layout: 'auto',
    // WebGPU takes booleans as numbers (0 false).
    compute: {
      module,
      entryPoint,
      constants: Object.fromEntries(Object.entries(constants).map(([k, v]) => [k, Number(v)])),
    },
  });
  const bind = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
  });
  return async (): Promise<number> => {
    const enc = device.createCommandEncoder({ label });
    const pass = enc.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bind);
    pass.dispatchWorkgroups(workgroups[0], workgroups[1]);
    pass.end();
    const t0 = performance.now();
    device.queue.submit([enc.finish()]);
    await device.queue.onSubmittedWorkDone();
    return performance.now() - t0;
  };
}

/** Timed runs of each way, after one untimed run each: the fastest counts. A close call (the two
 * fastest within STAGING_CLOSE of each other) takes more rounds, up to STAGING_MAX_ROUNDS: a run
 * held up behind other work of the same GPU process (another test file, another tab) can make
 * either way look slower than it is, and only more runs let each show its fastest. */
const STAGING_ROUNDS = 3;
const STAGING_MAX_ROUNDS = 8;
const STAGING_CLOSE = 0.1;

export interface StagingMeasurement {
  readonly staging: MatmulStaging;
  /** The fastest of `rounds` runs of each, in milliseconds. */
  readonly stagedMs: number;
  readonly directMs: number;
  /** STAGING_ROUNDS, or up to STAGING_MAX_ROUNDS on a close call. */
  readonly rounds: number;
}

/**
 * Times the real tiled matmul (matmul.wgsl, the CPU profile's tile, matmulStagingProbe: dy·W at
 * 128×576×576, 85 M flops: 30–60 ms on lavapipe) staged and direct, alternating,
 * and keeps the faster. A copy of the kernel would not do: on SwiftShader a simplified probe
 * without the kernel's bounds checks measured direct faster, the real kernel slower. Raw buffers,
 * destroyed before it returns: nothing of it is counted as the context's work or memory.
 */
export async function measureMatmulStaging(device: GPUDevice): Promise<StagingMeasurement> {
  const probe = matmulStagingProbe();
  const { M, N, K } = probe.dims;
  const storage = (label: string, floats: number) =>
    device.createBuffer({
      label: `matmul staging probe ${label}`,
      size: 4 * Math.max(floats, 4),
      usage: GPUBufferUsage.STORAGE,
    });
  // A run that failed validation would finish at once either way, and its timing decide nothing.
  device.pushErrorScope('validation');
  const uniforms = device.createBuffer({
    label: 'matmul staging probe uniforms',
    size: probe.uniforms.byteLength,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  const buffers = [
    uniforms,
    storage('a', M * K),
    storage('w', K * N),
    storage('bias', N),
    storage('a2', 4),
    storage('b2', 4),
    storage('c', M * N),
  ];
  let timed: { stagedMs: number; directMs: number; rounds: number } | undefined;
  let failure: unknown;
  try {
    device.queue.writeBuffer(uniforms, 0, probe.uniforms);
    const module = device.createShaderModule({ label: 'matmul staging probe', code: probe.source });
    const timer = (direct: boolean) =>
      dispatchTimer(
        device,
        module,
        `matmul staging probe ${direct ? 'direct' : 'staged'}`,
        probe.entryPoint,
        probe.constants(direct),
        buffers,
        probe.workgroups,
      );
    const staged = await timer(false);
    const direct = await timer(true);
    await staged();
    await direct();
    let stagedMs = Number.POSITIVE_INFINITY;
    let directMs = Number.POSITIVE_INFINITY;
    const close = () => Math.abs(stagedMs - directMs) < STAGING_CLOSE * Math.max(stagedMs, directMs);
    let rounds = 0;
    while (rounds < STAGING_ROUNDS || (close() && rounds < STAGING_MAX_ROUNDS)) {
      stagedMs = Math.min(stagedMs, await staged());
      directMs = Math.min(directMs, await direct());
      rounds++;
    }
    timed = { stagedMs, directMs, rounds };
  } catch (cause) {
    failure = cause;
  }
  const error = await device.popErrorScope();
  for (const b of buffers) b.destroy();
  if (failure !== undefined) throw failure;
  if (error) throw new Error(`the matmul staging probe failed validation: ${error.message}`);
  const { stagedMs, directMs, rounds } = timed as { stagedMs: number; directMs: number; rounds: number };
  return { staging: directMs < stagedMs ? 'direct' : 'workgroup', stagedMs, directMs, rounds };
}
