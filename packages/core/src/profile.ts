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

export type KernelProfile = 'gpu' | 'cpu';

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
    const prepare = async (rounds: number) => {
      const pipeline = await device.createComputePipelineAsync({
        label: `probe_throughput ${rounds}`,
        layout: 'auto',
        compute: { module, entryPoint: 'main', constants: { ROUNDS: rounds } },
      });
      const bind = device.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: [{ binding: 0, resource: { buffer: out } }],
      });
      return async (): Promise<number> => {
        const enc = device.createCommandEncoder({ label: 'probe_throughput' });
        const pass = enc.beginComputePass();
        pass.setPipeline(pipeline);
        pass.setBindGroup(0, bind);
        pass.dispatchWorkgroups(WORKGROUPS);
        pass.end();
        const t0 = performance.now();
        device.queue.submit([enc.finish()]);
        await device.queue.onSubmittedWorkDone();
        return performance.now() - t0;
      };
    };
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
