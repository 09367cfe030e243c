// Which kernel configurations an adapter gets from what it says about itself (profile.ts); the
// measurement runs on real adapters in context.test.ts. Here it runs against a queue whose
// timings are scripted, to show which of them it trusts when other work holds the GPU up.
import { describe, expect, it } from 'vitest';
import { measureKernelProfile, profileFromInfo, stagingFromInfo } from '../src/profile.js';

const info = (over: Partial<Parameters<typeof profileFromInfo>[0]>) => ({
  vendor: '',
  architecture: '',
  device: '',
  description: '',
  isFallbackAdapter: false,
  ...over,
});

describe('kernel profile from adapter info', () => {
  it('gives CPU kernels to software drivers and fallback adapters', () => {
    expect(profileFromInfo(info({ vendor: 'google', architecture: 'swiftshader', isFallbackAdapter: true }))).toBe(
      'cpu',
    );
    expect(profileFromInfo(info({ description: 'llvmpipe (LLVM 15.0.6, 256 bits)' }))).toBe('cpu');
    expect(profileFromInfo(info({ vendor: 'mesa', description: 'lavapipe' }))).toBe('cpu');
    expect(profileFromInfo(info({ vendor: 'intel', isFallbackAdapter: true }))).toBe('cpu');
  });

  it('gives GPU kernels to a named GPU, whatever its feature level', () => {
    expect(profileFromInfo(info({ vendor: 'nvidia', architecture: 'hopper' }))).toBe('gpu');
    expect(profileFromInfo(info({ vendor: 'apple', architecture: 'metal-3' }))).toBe('gpu');
    expect(profileFromInfo(info({ description: 'ANGLE (Intel, Mesa Intel(R) UHD Graphics 620)' }))).toBe('gpu');
  });

  it('cannot tell from an adapter that names nothing (then it is measured)', () => {
    expect(profileFromInfo(info({}))).toBeUndefined();
  });
});

describe('matmul staging from adapter info', () => {
  it('reads straight from the buffers on lavapipe and stages on SwiftShader, as they measured', () => {
    expect(stagingFromInfo(info({ description: 'llvmpipe (LLVM 15.0.6, 256 bits)' }))).toBe('direct');
    expect(stagingFromInfo(info({ vendor: 'mesa', description: 'lavapipe' }))).toBe('direct');
    expect(stagingFromInfo(info({ vendor: 'google', architecture: 'swiftshader', isFallbackAdapter: true }))).toBe(
      'workgroup',
    );
  });

  it('leaves any other adapter to the measurement', () => {
    expect(stagingFromInfo(info({}))).toBeUndefined();
    expect(stagingFromInfo(info({ vendor: 'intel', isFallbackAdapter: true }))).toBeUndefined();
  });
});

/** A device whose queue takes the scripted milliseconds per submission, in order, and counts
 * them; the probe's own pipelines say by their label whether they carry the work. */
function scriptedDevice(script: readonly number[]) {
  const submitted: string[] = [];
  let pending = 0;
  let label = '';
  const device = {
    createShaderModule: () => ({}),
    createBuffer: () => ({ destroy() {} }),
    createComputePipelineAsync: async (d: { label: string }) => ({
      label: d.label,
      getBindGroupLayout: () => ({}),
    }),
    createBindGroup: () => ({}),
    createCommandEncoder: () => ({
      beginComputePass: () => ({
        setPipeline: (p: { label: string }) => {
          label = p.label;
        },
        setBindGroup() {},
        dispatchWorkgroups() {},
        end() {},
      }),
      finish: () => ({}),
    }),
    queue: {
      submit() {
        pending = script[submitted.length] ?? 0;
        submitted.push(label);
      },
      onSubmittedWorkDone: () => new Promise((resolve) => setTimeout(resolve, pending)),
    },
  };
  return { device: device as unknown as GPUDevice, submitted };
}

describe('kernel profile measured', () => {
  const g = globalThis as { GPUBufferUsage?: unknown };
  g.GPUBufferUsage ??= { STORAGE: 0x80 };

  it('calls a CPU adapter CPU when other work delays its first empty dispatches', async () => {
    // lavapipe's timings (about 1 ms empty, 80 ms of work) behind another file's dispatches: the
    // first two pairs wait about as long with or without the work.
    const { device, submitted } = scriptedDevice([90, 95, 90, 92, 1, 80]);
    const m = await measureKernelProfile(device);
    expect(m.profile).toBe('cpu');
    expect(m.pairs).toBeGreaterThanOrEqual(3); // more only if a timer of this machine ran late
    expect(m.plainMs).toBeLessThan(20);
    // Pairs alternate, the empty dispatch first.
    expect(submitted).toEqual(Array.from({ length: 2 * m.pairs }, (_, i) => `probe_throughput ${i % 2 ? 128 : 0}`));
  });

  it('calls a GPU a GPU when other work delays one of its dispatches with the work', async () => {
    const { device } = scriptedDevice([1, 60, 1, 3]);
    const m = await measureKernelProfile(device);
    expect(m.profile).toBe('gpu');
    expect(m.workMs).toBeLessThan(50);
  });

  it('stops after a bounded number of pairs when the queue never clears', async () => {
    const { device, submitted } = scriptedDevice(Array.from({ length: 40 }, () => 30));
    const m = await measureKernelProfile(device);
    expect(m.pairs).toBe(8);
    expect(submitted).toHaveLength(16);
    expect(m.profile).toBe('gpu'); // nothing showed the work to cost more than the wait
  });
});
