// The GPU runtime: real adapter limits, typed errors raised before the GPU sees bad input,
// buffer lifetimes, one-submit step encoding and timing.
import { describe, expect, inject, it } from 'vitest';
import {
  createGpuContext,
  createTensor,
  DeviceLostError,
  describeAdapter,
  diffCounters,
  getKernel,
  LimitExceededError,
  measureKernelProfile,
  measureMatmulStaging,
  measureSubgroupLayout,
  planAddScaled,
  planMatmul,
  planSiluMulBackward,
  profileFromInfo,
  readFloat32,
  readTensor,
  ShaderCompileError,
  ShapeError,
  StepEncoder,
  stagingFromInfo,
  type Tensor,
  TensorArena,
  tensorFromData,
  tensorView,
  WebGpuUnavailableError,
  writeTensor,
} from '../src/index.js';
import { gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

describe('GPU context', () => {
  it('asks the device for every limit the adapter reports', () => {
    const ctx = gpu();
    const device = ctx.limits as unknown as Record<string, number>;
    for (const [name, value] of Object.entries(ctx.adapterLimits)) {
      expect(device[name], name).toBe(value);
    }
    // The spec defaults are 128 MiB / 256 MiB; every adapter we run on reports at least that.
    expect(ctx.limits.maxStorageBufferBindingSize).toBeGreaterThanOrEqual(128 * 2 ** 20);
  });

  it('reports the optional features as booleans', () => {
    const ctx = gpu();
    expect(typeof ctx.features.shaderF16).toBe('boolean');
    expect(typeof ctx.features.timestampQuery).toBe('boolean');
    expect(typeof ctx.features.subgroups).toBe('boolean');
    expect(ctx.features.shaderF16).toBe(ctx.device.features.has('shader-f16'));
  });

  it('turns subgroup reductions on only when the adapter has them and their layout measures contiguous', async () => {
    const ctx = gpu();
    const has = ctx.device.features.has('subgroups');
    expect(ctx.features.subgroups).toBe(has && (await measureSubgroupLayout(ctx.device, 64)).contiguous);
    if (ctx.features.subgroups) {
      // WebGPU's subgroup sizes are powers of two from 4 to 128 (SwiftShader: 4).
      expect([4, 8, 16, 32, 64, 128]).toContain(ctx.features.subgroupSize);
      expect(describeAdapter(ctx)).toContain(`subgroups ${ctx.features.subgroupSize}`);
    } else {
      expect(ctx.features.subgroupSize).toBe(0);
    }
    const without = await createGpuContext({
      featureLevel: inject('featureLevel') ?? 'core',
      kernelProfile: 'cpu',
      matmulStaging: 'workgroup',
      allowSubgroups: false,
    });
    try {
      expect([without.features.subgroups, without.features.subgroupSize]).toEqual([false, 0]);
      expect(without.device.features.has('subgroups')).toBe(false);
    } finally {
      without.destroy();
    }
  });

  it('chooses kernel configurations from what the adapter is, measuring when its info names nothing', async () => {
    const ctx = gpu();
    const forced = inject('kernelProfile') ?? 'auto';
    const named = profileFromInfo(ctx.adapter);
    if (forced !== 'auto') {
      expect([ctx.kernelProfile, ctx.kernelProfileSource]).toEqual([forced, 'forced']);
    } else {
      // Every adapter of this test matrix is a CPU driver: SwiftShader says so (a fallback adapter);
      // lavapipe in compatibility mode says nothing and is measured.
      expect(ctx.kernelProfile).toBe('cpu');
      expect(ctx.kernelProfileSource).toBe(named ? 'adapter info' : 'measured');
    }
    // The measurement, on every adapter (lavapipe's is the one a context would make itself).
    const m = await measureKernelProfile(ctx.device);
    console.log(
      `kernel profile probe on ${describeAdapter(ctx)}: ${m.workMs.toFixed(1)} ms of work, ${m.plainMs.toFixed(1)} ms without (fastest of ${m.pairs} pairs)`,
    );
    expect(m.profile).toBe('cpu');
    expect(m.workMs).toBeGreaterThan(m.plainMs);
    expect(ctx.takeUncapturedErrors()).toEqual([]);
  });

  it('measures how the tiled matmuls read their operands on CPU profiles, and takes a forced choice', async () => {
    const ctx = gpu();
    // GPU profiles stage (what tiles are for); CPU ones take the driver's known answer where its name
    // gives one (lavapipe in compatibility mode names nothing and is measured: either answer).
    const known = stagingFromInfo(ctx.adapter);
    if (ctx.kernelProfile === 'gpu') expect(ctx.matmulStaging).toBe('workgroup');
    else if (known) expect(ctx.matmulStaging).toBe(known);
    const m = await measureMatmulStaging(ctx.device);
    console.log(
      `matmul staging probe on ${describeAdapter(ctx)}: staged ${m.stagedMs.toFixed(2)} ms, direct ${m.directMs.toFixed(2)} ms (fastest of ${m.rounds}): ${m.staging}`,
    );
    expect(m.stagedMs).toBeGreaterThan(0);
    expect(m.directMs).toBeGreaterThan(0);
    // Three rounds, more (up to eight) only while the two are within a tenth of each other.
    const close = Math.abs(m.stagedMs - m.directMs) < 0.1 * Math.max(m.stagedMs, m.directMs);
    expect(m.rounds).toBeGreaterThanOrEqual(3);
    expect(m.rounds).toBeLessThanOrEqual(8);
    if (m.rounds < 8) expect(close, 'a close call stopped short').toBe(false);
    expect(m.staging).toBe(m.directMs < m.stagedMs ? 'direct' : 'workgroup');
    expect(ctx.takeUncapturedErrors()).toEqual([]);
    for (const matmulStaging of ['workgroup', 'direct'] as const) {
      const forced = await createGpuContext({
        featureLevel: inject('featureLevel') ?? 'core',
        kernelProfile: 'gpu',
        matmulStaging,
      });
      try {
        expect(forced.matmulStaging).toBe(matmulStaging);
        expect(describeAdapter(forced).includes('direct matmul')).toBe(matmulStaging === 'direct');
      } finally {
        forced.destroy();
      }
    }
  });

  it('says what to enable when there is no adapter', async () => {
    const noAdapter = { requestAdapter: async () => null } as unknown as GPU;
    const err = await createGpuContext({ gpu: noAdapter }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WebGpuUnavailableError);
    expect(String((err as Error).message)).toMatch(/no adapter/);
    expect(String((err as Error).message)).toMatch(/enable-unsafe-webgpu/);
    // A GPU object handed in under Node still gets the advice for Node (and is described as Node).
    const underNode = describeAdapter(gpu()).includes('(node');
    expect(String((err as Error).message).includes('Under Node')).toBe(underNode);
  });
});

describe('buffers', () => {
  it('counts live buffers and releases them on dispose', async () => {
    const ctx = gpu();
    const before = ctx.liveBufferCount;
    const t = createTensor(ctx, [3, 5], 'f32', 'counted');
    expect(ctx.liveBufferCount).toBe(before + 1);
    expect(ctx.liveBufferLabels()).toContain('counted');
    t.dispose();
    t.dispose(); // idempotent
    expect(ctx.liveBufferCount).toBe(before);
  });

  it('rejects a buffer above maxBufferSize before WebGPU sees it', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'too big', async () => {
      const rows = Math.ceil(ctx.limits.maxBufferSize / 4 / 1024) + 1;
      const err = (() => {
        try {
          createTensor(ctx, [rows, 1024], 'f32', 'huge');
        } catch (e) {
          return e;
        }
      })();
      expect(err).toBeInstanceOf(LimitExceededError);
      expect((err as LimitExceededError).limit).toMatch(/maxBufferSize|maxStorageBufferBindingSize/);
      expect((err as Error).message).toMatch(/huge/);
    });
  });

  it('rejects dimensions that are not positive integers', () => {
    const ctx = gpu();
    expect(() => createTensor(ctx, [2, 1.5], 'f32', 'frac')).toThrow(ShapeError);
    expect(() => createTensor(ctx, [0, 4], 'f32', 'empty')).toThrow(/not a positive integer/);
    expect(() => tensorFromData(ctx, [1, 2, 3], [2, 2], 'f32', 'short')).toThrow(/3 values given/);
  });

  it('round-trips f32, i32 and f16 data', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'round trip', async () => {
      const f = tensorFromData(ctx, [1.5, -2, 3.25], [3], 'f32', 'f');
      const i = tensorFromData(ctx, [7, -1, 2 ** 30], [3], 'i32', 'i');
      const h = tensorFromData(ctx, [0.1, 65504, -3], [3], 'f16', 'h');
      expect([...(await readFloat32(f))]).toEqual([1.5, -2, 3.25]);
      await expect(readFloat32(i)).rejects.toThrow(/not a float tensor/);
      expect([...(await readTensor(i))]).toEqual([7, -1, 2 ** 30]);
      expect([...(await readTensor(h))]).toEqual([0.0999755859375, 65504, -3]);
      for (const t of [f, i, h]) t.dispose();
    });
  });
});

describe('views and arenas', () => {
  it('keeps small tensors at aligned offsets of one buffer, bound and cleared by range', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'arena', async () => {
      const before = ctx.liveBufferCount;
      const arena = new TensorArena(
        ctx,
        [
          { shape: [3], label: 'p0' },
          { shape: [5, 2], label: 'p1' },
          { shape: [1], label: 'p2' },
        ],
        'params',
      );
      expect(ctx.liveBufferCount).toBe(before + 1);
      const [p0, p1, p2] = arena.views as [Tensor, Tensor, Tensor];
      for (const v of arena.views) expect(v.byteOffset % ctx.limits.minStorageBufferOffsetAlignment).toBe(0);
      writeTensor(p0, [1, 2, 3]);
      writeTensor(p1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      writeTensor(p2, [42]);
      // A kernel reads one view and writes another arena's view at its offset.
      const out = new TensorArena(
        ctx,
        [
          { shape: [4], label: 'o0' },
          { shape: [10], label: 'o1' },
        ],
        'outs',
      );
      const add = await planAddScaled(ctx, p1, p1, out.views[1] as Tensor, 0.5);
      new StepEncoder(ctx, 'views').dispatch(add).clear(p0).submit();
      expect([...(await readFloat32(out.views[1] as Tensor))]).toEqual([1.5, 3, 4.5, 6, 7.5, 9, 10.5, 12, 13.5, 15]);
      expect([...(await readFloat32(out.views[0] as Tensor))]).toEqual([0, 0, 0, 0]);
      expect([...(await readFloat32(p0))]).toEqual([0, 0, 0]);
      expect([...(await readFloat32(p2))]).toEqual([42]);
      add.dispose();
      p1.dispose(); // a view: releases nothing
      expect(ctx.liveBufferCount).toBe(before + 2);
      arena.dispose();
      out.dispose();
    });
  });

  it('refuses misaligned or out-of-range views', () => {
    const ctx = gpu();
    const t = createTensor(ctx, [1024], 'f32', 'base');
    expect(() => tensorView(t, 4, [2], 'f32', 'odd')).toThrow(/not a multiple/);
    expect(() => tensorView(t, 0, [2000], 'f32', 'long')).toThrow(/outside base/);
    t.dispose();
  });
});

describe('shape checks at the API boundary', () => {
  it('names both operands when a matmul does not fit', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'mismatch', async () => {
      const a = createTensor(ctx, [4, 6], 'f32', 'x');
      const w = createTensor(ctx, [5, 7], 'f32', 'W0');
      const c = createTensor(ctx, [4, 5], 'f32', 'y');
      await expect(planMatmul(ctx, a, w, c)).rejects.toThrow(/x \[4, 6\].*W0 \[5, 7\]/);
      await expect(planMatmul(ctx, a, w, c)).rejects.toBeInstanceOf(ShapeError);
      for (const t of [a, w, c]) t.dispose();
    });
  });
});

describe('kernel registry', () => {
  it('reports WGSL errors with the file and line', async () => {
    const ctx = gpu();
    const source = 'fn ok() {}\n@compute @workgroup_size(1)\nfn main() {\n  let x: u32 = nope;\n}\n';
    const err = await getKernel(ctx, { source, file: 'shaders/broken.wgsl', entryPoint: 'main', bindings: [] }).catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ShaderCompileError);
    expect((err as ShaderCompileError).messages[0]?.line).toBe(4);
    expect((err as Error).message).toMatch(/shaders\/broken\.wgsl:4/);
    expect((err as Error).message).toMatch(/nope/);
  });

  it('builds each pipeline once per device', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'cache', async () => {
      const a = createTensor(ctx, [8], 'f32', 'a');
      const o1 = createTensor(ctx, [8], 'f32', 'o1');
      const o2 = createTensor(ctx, [8], 'f32', 'o2');
      const d1 = await planAddScaled(ctx, a, a, o1);
      const d2 = await planAddScaled(ctx, a, a, o2);
      expect(d1.kernel).toBe(d2.kernel);
      expect(d1.bindGroup).not.toBe(d2.bindGroup);
      for (const d of [d1, d2]) d.dispose();
      for (const t of [a, o1, o2]) t.dispose();
    });
  });

  it('refuses to bind a written buffer twice', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'aliasing', async () => {
      const a = createTensor(ctx, [8], 'f32', 'a');
      await expect(planAddScaled(ctx, a, a, a)).rejects.toThrow(/written and also bound/);
      a.dispose();
    });
  });

  it('binds disjoint views of one buffer as two outputs of a dispatch, not overlapping ones', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'disjoint outputs', async () => {
      // silu·mul's backward writes dgate and dup: here two views of one arena, as LoRA gradients are.
      const align = ctx.limits.minStorageBufferOffsetAlignment;
      const arena = createTensor(ctx, [(2 * align) / 4], 'f32', 'arena');
      const gate = tensorFromData(ctx, [0.5, -1, 2, 0], [4], 'f32', 'gate');
      const up = tensorFromData(ctx, [1, 2, 3, 4], [4], 'f32', 'up');
      const dout = tensorFromData(ctx, [1, 1, 1, 1], [4], 'f32', 'dout');
      const dgate = tensorView(arena, 0, [4], 'f32', 'dgate');
      const dup = tensorView(arena, align, [4], 'f32', 'dup');
      const d = await planSiluMulBackward(ctx, { gate, up, dout, dgate, dup });
      new StepEncoder(ctx, 'disjoint').dispatch(d).submit();
      const got = await readFloat32(arena);
      const silu = (g: number) => g / (1 + Math.exp(-g));
      expect(got[align / 4] ?? 0).toBeCloseTo(silu(0.5), 6);
      expect(got[align / 4 + 2] ?? 0).toBeCloseTo(silu(2), 6);
      const overlapping = tensorView(arena, 0, [4], 'f32', 'dup (overlapping dgate)');
      await expect(planSiluMulBackward(ctx, { gate, up, dout, dgate, dup: overlapping })).rejects.toThrow(
        /written and also bound/,
      );
      d.dispose();
      for (const t of [arena, gate, up, dout]) t.dispose();
    });
  });
});

describe('step encoder', () => {
  it('records several dispatches and submits once, in order', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'chain', async () => {
      const a = tensorFromData(ctx, [1, 2, 3, 4], [4], 'f32', 'a');
      const b = createTensor(ctx, [4], 'f32', 'b');
      const c = createTensor(ctx, [4], 'f32', 'c');
      const first = await planAddScaled(ctx, a, a, b, 2); // b = 3a
      const second = await planAddScaled(ctx, b, a, c, -1); // c = 2a
      const enc = new StepEncoder(ctx, 'two dispatches', { timing: true });
      enc.dispatch(first, second).submit();
      expect(() => enc.submit()).toThrow(/already submitted/);
      expect([...(await readFloat32(c))]).toEqual([2, 4, 6, 8]);
      const ms = await enc.gpuMilliseconds();
      if (ctx.features.timestampQuery) expect(ms).toBeGreaterThanOrEqual(0);
      else expect(ms).toBeUndefined();
      for (const d of [first, second]) d.dispose();
      for (const t of [a, b, c]) t.dispose();
    });
  });
});

describe('work counters', () => {
  it('counts dispatches, submits, readbacks and blocking readbacks exactly, and the peak of live bytes', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'counters', async () => {
      const a = tensorFromData(ctx, [1, 2, 3, 4], [4], 'f32', 'a');
      const b = createTensor(ctx, [4], 'f32', 'b');
      const add = await planAddScaled(ctx, a, a, b, 1);
      ctx.resetPeakLiveBytes();
      const start = ctx.counters;
      expect(start.peakLiveBytes).toBe(ctx.liveBytes);
      new StepEncoder(ctx, 'three').dispatch(add, add).dispatch(add).submit();
      let now = diffCounters(start, ctx.counters);
      expect([now.dispatches, now.submits, now.readbacks, now.blockingReadbacks]).toEqual([3, 1, 0, 0]);
      // Awaited with nothing queued after it: the host waits on an idle queue.
      expect([...(await readFloat32(b))]).toEqual([2, 4, 6, 8]);
      now = diffCounters(start, ctx.counters);
      expect([now.dispatches, now.submits, now.readbacks, now.blockingReadbacks]).toEqual([3, 2, 1, 1]);
      // The next step is queued before the readback's data arrives: not blocking.
      const pending = readFloat32(b);
      new StepEncoder(ctx, 'next').dispatch(add).submit();
      await pending;
      now = diffCounters(start, ctx.counters);
      expect([now.dispatches, now.submits, now.readbacks, now.blockingReadbacks]).toEqual([4, 4, 2, 1]);
      // The staging buffers of the readbacks were live for a moment: the peak saw them.
      expect(ctx.counters.peakLiveBytes).toBeGreaterThan(ctx.liveBytes);
      add.dispose();
      for (const t of [a, b]) t.dispose();
    });
  });
});

describe('device loss', () => {
  it('turns a lost device into DeviceLostError', async () => {
    const ctx = await createGpuContext({
      featureLevel: gpu().adapter.featureLevel,
      kernelProfile: gpu().kernelProfile,
      matmulStaging: gpu().matmulStaging,
      label: 'doomed',
    });
    ctx.destroy();
    const lost = await ctx.lost;
    expect(lost).toBeInstanceOf(DeviceLostError);
    expect(() => createTensor(ctx, [4], 'f32', 'after')).toThrow(DeviceLostError);
  });
});
