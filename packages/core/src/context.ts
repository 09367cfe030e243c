import {
  DeviceLostError,
  GpuValidationError,
  LimitExceededError,
  OutOfMemoryError,
  WebGpuUnavailableError,
} from './errors.js';
import { isNode, requestNodeAdapter } from './node-gpu.js';
import {
  type KernelProfile,
  type KernelProfileSource,
  type MatmulStaging,
  measureKernelProfile,
  measureMatmulStaging,
  profileFromInfo,
  stagingFromInfo,
} from './profile.js';
import { measureSubgroupLayout } from './subgroups.js';

export interface GpuContextOptions {
  /** Use this GPU object instead of `navigator.gpu` / the `webgpu` package. */
  gpu?: GPU;
  /** 'compatibility' accepts OpenGL ES-class adapters (lavapipe through ANGLE, older devices). */
  featureLevel?: 'core' | 'compatibility';
  powerPreference?: GPUPowerPreference;
  /** Use shader-f16 when the adapter has it (default true). */
  allowShaderF16?: boolean;
  /**
   * Use subgroup operations in the reduction kernels when the adapter has the feature and its
   * subgroups measure as runs of consecutive invocations (default true; see subgroups.ts).
   */
  allowSubgroups?: boolean;
  /**
   * Which kernel configurations to use (see profile.ts). 'auto' (the default) reads the adapter's
   * info and measures when it names nothing; 'gpu' or 'cpu' forces one (tests run the GPU
   * configurations on software adapters this way).
   */
  kernelProfile?: 'auto' | KernelProfile;
  /**
   * How the tiled matmuls read their operands (profile.ts, MatmulStaging). 'auto' (the default)
   * stages on GPU profiles and measures on CPU ones; tests force either.
   */
  matmulStaging?: 'auto' | MatmulStaging;
  label?: string;
  /** Called for WebGPU errors that no error scope caught (always a bug in webtune). */
  onUncapturedError?: (error: GPUError) => void;
}

export interface GpuFeatures {
  readonly shaderF16: boolean;
  readonly timestampQuery: boolean;
  /** Subgroup reductions are on: the adapter has 'subgroups' and the layout probe passed. */
  readonly subgroups: boolean;
  /** The subgroup size the probe measured (0 when subgroups are off). */
  readonly subgroupSize: number;
}

export interface GpuAdapterDescription {
  readonly vendor: string;
  readonly architecture: string;
  readonly device: string;
  readonly description: string;
  readonly isFallbackAdapter: boolean;
  readonly featureLevel: 'core' | 'compatibility';
  readonly runtime: 'browser' | 'node';
  /** Set under Node when no hardware adapter was found and a software driver was used. */
  readonly softwareFallback?: string;
}

/** Limits we always ask for by name, in case an implementation's limits object is not
 * enumerable. Any other limit the adapter reports is requested too. */
const KNOWN_LIMITS = [
  'maxBufferSize',
  'maxStorageBufferBindingSize',
  'maxUniformBufferBindingSize',
  'maxStorageBuffersPerShaderStage',
  'maxComputeWorkgroupStorageSize',
  'maxComputeInvocationsPerWorkgroup',
  'maxComputeWorkgroupSizeX',
  'maxComputeWorkgroupSizeY',
  'maxComputeWorkgroupSizeZ',
  'maxComputeWorkgroupsPerDimension',
  'maxBindGroups',
  'maxBindingsPerBindGroup',
  'minStorageBufferOffsetAlignment',
  'minUniformBufferOffsetAlignment',
] as const;

/** Storage buffer sizes are rounded up to this so vec4 views of any buffer stay in bounds. */
export const BUFFER_ALIGNMENT = 16;

interface TrackedBuffer {
  readonly label: string;
  readonly size: number;
}

/**
 * What this context has asked of the GPU since it was made: exact counts kept by the calls that do
 * the work (StepEncoder.submit, readBytes), not estimates. Take two snapshots (`ctx.counters`) and
 * subtract (`diffCounters`) to get the cost of one training step or one decoded token.
 */
export interface GpuCounters {
  /** Compute dispatches in submitted command buffers. */
  readonly dispatches: number;
  /** queue.submit calls. */
  readonly submits: number;
  /** Buffers mapped to read GPU results on the host. */
  readonly readbacks: number;
  /**
   * Readbacks whose data came back while nothing had been submitted after them: the queue ran dry
   * while the host waited for the result, so the next step's work could not yet be queued. A
   * pipelined loop (submit step n + 1, then read step n) has none as long as the host prepares a
   * step faster than the GPU runs one; a slower host drains the queue for real, and this counts it.
   */
  readonly blockingReadbacks: number;
  /** The most bytes of live buffers at any moment since the last resetPeakLiveBytes(). */
  readonly peakLiveBytes: number;
}

/** b − a for every count (the peak is b's). */
export function diffCounters(a: GpuCounters, b: GpuCounters): GpuCounters {
  return {
    dispatches: b.dispatches - a.dispatches,
    submits: b.submits - a.submits,
    readbacks: b.readbacks - a.readbacks,
    blockingReadbacks: b.blockingReadbacks - a.blockingReadbacks,
    peakLiveBytes: b.peakLiveBytes,
  };
}

/**
 * One WebGPU device with what we learned about its adapter, and the bookkeeping every part of
 * webtune shares: live buffers (for leak checks and memory accounting), device loss, and
 * uncaptured errors. Passed explicitly as the first argument everywhere; there is no global.
 */
export class GpuContext {
  readonly device: GPUDevice;
  readonly adapter: GpuAdapterDescription;
  readonly features: GpuFeatures;
  readonly limits: GPUSupportedLimits;
  /** What the adapter reported; the device was asked for all of it. */
  readonly adapterLimits: Readonly<Record<string, number>>;
  readonly label: string;
  /** Resolves if the device is lost; never rejects. */
  readonly lost: Promise<DeviceLostError>;
  /** The kernel configurations this device gets, and how that was decided (see profile.ts). */
  readonly kernelProfile: KernelProfile;
  readonly kernelProfileSource: KernelProfileSource;
  /** How the tiled matmuls read their operands (profile.ts, measureMatmulStaging). */
  readonly matmulStaging: MatmulStaging;

  private lostError: DeviceLostError | undefined;
  private readonly live = new Map<GPUBuffer, TrackedBuffer>();
  private liveTotal = 0;
  private peakLive = 0;
  private dispatchCount = 0;
  private submitCount = 0;
  private readbackCount = 0;
  private blockingCount = 0;
  private readonly uncaptured: GPUError[] = [];
  private readonly placeholders = new Map<string, GPUBuffer>();
  // Holds the Dawn instance under Node for as long as the device lives (see node-gpu.ts).
  private readonly keepAlive: unknown;
  private destroyed = false;

  constructor(args: {
    device: GPUDevice;
    adapter: GpuAdapterDescription;
    features: GpuFeatures;
    adapterLimits: Record<string, number>;
    label: string;
    keepAlive?: unknown;
    onUncapturedError?: (error: GPUError) => void;
    kernelProfile: KernelProfile;
    kernelProfileSource: KernelProfileSource;
    matmulStaging?: MatmulStaging;
  }) {
    this.device = args.device;
    this.kernelProfile = args.kernelProfile;
    this.kernelProfileSource = args.kernelProfileSource;
    this.matmulStaging = args.matmulStaging ?? 'workgroup';
    this.adapter = args.adapter;
    this.features = args.features;
    this.limits = args.device.limits;
    this.adapterLimits = args.adapterLimits;
    this.label = args.label;
    this.keepAlive = args.keepAlive;
    this.lost = args.device.lost.then((info) => {
      this.lostError = new DeviceLostError(info.reason, info.message);
      return this.lostError;
    });
    const onError = args.onUncapturedError;
    args.device.addEventListener('uncapturederror', (event) => {
      const error = (event as GPUUncapturedErrorEvent).error;
      this.uncaptured.push(error);
      onError?.(error);
    });
  }

  /** True after the device was lost or destroyed. */
  get isLost(): boolean {
    return this.lostError !== undefined || this.destroyed;
  }

  /** Throws DeviceLostError if the device is gone; called before any work is recorded. */
  assertAlive(): void {
    if (this.lostError) throw this.lostError;
    if (this.destroyed) throw new DeviceLostError('destroyed', `context ${this.label} was destroyed`);
  }

  /**
   * Creates a buffer after checking it against the device's limits, and tracks it until
   * `releaseBuffer`. Sizes are rounded up to 16 bytes. `bindsAsStorage` also checks the
   * binding-size limit, since a bigger buffer could be created but never bound whole.
   */
  createBuffer(desc: { label: string; size: number; usage: GPUBufferUsageFlags; bindsAsStorage?: boolean }): GPUBuffer {
    this.assertAlive();
    const size = Math.max(BUFFER_ALIGNMENT, alignUp(desc.size, BUFFER_ALIGNMENT));
    if (size > this.limits.maxBufferSize) {
      throw new LimitExceededError('maxBufferSize', size, this.limits.maxBufferSize, desc.label);
    }
    if (desc.bindsAsStorage && size > this.limits.maxStorageBufferBindingSize) {
      throw new LimitExceededError(
        'maxStorageBufferBindingSize',
        size,
        this.limits.maxStorageBufferBindingSize,
        desc.label,
      );
    }
    const buffer = this.device.createBuffer({ label: desc.label, size, usage: desc.usage });
    this.live.set(buffer, { label: desc.label, size });
    this.liveTotal += size;
    this.peakLive = Math.max(this.peakLive, this.liveTotal);
    return buffer;
  }

  releaseBuffer(buffer: GPUBuffer): void {
    const tracked = this.live.get(buffer);
    if (!tracked) return;
    this.live.delete(buffer);
    this.liveTotal -= tracked.size;
    buffer.destroy();
  }

  /** Submits command buffers holding `dispatches` compute dispatches (counted in `counters`). */
  submit(commandBuffers: readonly GPUCommandBuffer[], dispatches = 0): void {
    this.assertAlive();
    this.device.queue.submit(commandBuffers);
    this.submitCount++;
    this.dispatchCount += dispatches;
  }

  /**
   * Maps `buffer` (MAP_READ) for reading once the work already submitted has filled it; resolves
   * when its bytes can be read, rejects if the device is lost first. Counts the readback, and
   * counts it as blocking when nothing was submitted between the call and the data's arrival.
   */
  async mapRead(buffer: GPUBuffer, offset: number, size: number): Promise<void> {
    this.assertAlive();
    const submitsBefore = this.submitCount;
    await Promise.race([buffer.mapAsync(0x1 /* READ */, offset, size), this.lost.then((e) => Promise.reject(e))]);
    this.readbackCount++;
    if (this.submitCount === submitsBefore) this.blockingCount++;
  }

  /** A snapshot of the work counts (see GpuCounters). */
  get counters(): GpuCounters {
    return {
      dispatches: this.dispatchCount,
      submits: this.submitCount,
      readbacks: this.readbackCount,
      blockingReadbacks: this.blockingCount,
      peakLiveBytes: this.peakLive,
    };
  }

  /** Starts a new peak of live bytes from what is live now. */
  resetPeakLiveBytes(): void {
    this.peakLive = this.liveTotal;
  }

  /** Number of buffers created through this context and not yet released. */
  get liveBufferCount(): number {
    return this.live.size;
  }

  /** Bytes held by live buffers. */
  get liveBytes(): number {
    return this.liveTotal;
  }

  /** Labels of live buffers, for leak reports. */
  liveBufferLabels(): string[] {
    return [...this.live.values()].map((b) => b.label);
  }

  /** WebGPU errors no scope caught since the last call; tests assert this is empty. */
  takeUncapturedErrors(): GPUError[] {
    return this.uncaptured.splice(0);
  }

  /**
   * Runs `fn` inside validation and out-of-memory error scopes. An out-of-memory error becomes
   * OutOfMemoryError (naming `what`); a validation error becomes GpuValidationError, since our
   * own checks should have caught bad input first.
   */
  async checked<T>(what: string, fn: () => T | Promise<T>): Promise<T> {
    this.assertAlive();
    const before = this.liveBytes;
    this.device.pushErrorScope('validation');
    this.device.pushErrorScope('out-of-memory');
    let result: T | undefined;
    let failure: { error: unknown } | undefined;
    try {
      result = await fn();
    } catch (error) {
      failure = { error };
    }
    const oom = await this.device.popErrorScope();
    const validation = await this.device.popErrorScope();
    // A GPU error is the root cause of whatever fn may have thrown after it.
    if (oom) throw new OutOfMemoryError(what, this.liveBytes - before, oom.message);
    if (validation) throw new GpuValidationError(`${what}: ${validation.message}`);
    if (failure) throw failure.error;
    return result as T;
  }

  /**
   * A 16-byte zeroed storage buffer to fill bindings a kernel declares but will not read (an
   * absent bias, say). Owned by the context and not counted as live. A read-write binding takes
   * a 'write' one, a different one per `slot` when a dispatch has several: one buffer bound
   * writable twice, or writable and read-only, in the same dispatch is a validation error.
   */
  placeholder(use: 'read' | 'write' = 'read', slot = 0): GPUBuffer {
    this.assertAlive();
    const key = use === 'read' ? 'placeholder' : `placeholder_rw${slot || ''}`;
    let buffer = this.placeholders.get(key);
    if (!buffer) {
      buffer = this.device.createBuffer({
        label: `${this.label}.${key}`,
        size: BUFFER_ALIGNMENT,
        usage: 0x80 /* STORAGE */,
      });
      this.placeholders.set(key, buffer);
    }
    return buffer;
  }

  /** Releases every tracked buffer and destroys the device. */
  destroy(): void {
    if (this.destroyed) return;
    for (const buffer of this.placeholders.values()) buffer.destroy();
    this.placeholders.clear();
    for (const buffer of this.live.keys()) buffer.destroy();
    this.live.clear();
    this.liveTotal = 0;
    this.destroyed = true;
    this.device.destroy();
    void this.keepAlive;
  }
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

const ENABLE_HINT =
  'Use a browser with WebGPU (Chrome/Edge 113+, or Firefox/Safari with WebGPU enabled; on Linux ' +
  'Chromium needs --enable-unsafe-webgpu), or under Node install the `webgpu` package.';

/**
 * Gets a device with the adapter's real limits (not the spec defaults) and the optional
 * features webtune uses: shader-f16, timestamp-query, subgroups.
 */
export async function createGpuContext(options: GpuContextOptions = {}): Promise<GpuContext> {
  const featureLevel = options.featureLevel ?? 'core';
  const request: GPURequestAdapterOptions = { featureLevel };
  if (options.powerPreference) request.powerPreference = options.powerPreference;

  let adapter: GPUAdapter | null = null;
  let keepAlive: unknown;
  // Where the code runs, whichever GPU object it was handed (Node may have a navigator.gpu too).
  const runtime: 'browser' | 'node' = isNode() ? 'node' : 'browser';
  let softwareFallback: string | undefined;
  const navigatorGpu = (globalThis as { navigator?: { gpu?: GPU } }).navigator?.gpu;
  if (options.gpu ?? navigatorGpu) {
    adapter = await (options.gpu ?? (navigatorGpu as GPU)).requestAdapter(request);
    keepAlive = options.gpu;
  } else if (isNode()) {
    const found = await requestNodeAdapter(request);
    adapter = found.adapter;
    keepAlive = found.gpu;
    softwareFallback = found.softwareFallback;
  } else {
    throw new WebGpuUnavailableError(`this environment has no WebGPU (navigator.gpu is missing). ${ENABLE_HINT}`);
  }
  if (!adapter) {
    throw new WebGpuUnavailableError(
      `WebGPU is present but no adapter was found (featureLevel ${featureLevel}). ${ENABLE_HINT}` +
        (runtime === 'node'
          ? ' Under Node on a machine without a GPU, install Chromium (it ships the SwiftShader ' +
            'Vulkan driver) or set VK_ICD_FILENAMES to a Vulkan driver Dawn accepts.'
          : ''),
    );
  }

  const wanted: GPUFeatureName[] = [];
  const has = (f: string) => adapter.features.has(f);
  const shaderF16 = (options.allowShaderF16 ?? true) && has('shader-f16');
  if (shaderF16) wanted.push('shader-f16');
  if (has('timestamp-query')) wanted.push('timestamp-query');
  if ((options.allowSubgroups ?? true) && has('subgroups')) wanted.push('subgroups' as GPUFeatureName);

  const requiredLimits: Record<string, number> = {};
  const limits = adapter.limits as unknown as Record<string, unknown>;
  const names = new Set<string>(KNOWN_LIMITS);
  for (const key in limits) names.add(key);
  for (const key of names) {
    const value = limits[key];
    if (typeof value === 'number') requiredLimits[key] = value;
  }

  const label = options.label ?? 'webtune';
  let device: GPUDevice;
  try {
    device = await adapter.requestDevice({
      label,
      requiredFeatures: wanted,
      requiredLimits,
    });
  } catch (cause) {
    throw new WebGpuUnavailableError(`the adapter refused to create a device: ${String(cause)}`, {
      cause,
    });
  }

  const info = adapter.info;
  const identity = {
    vendor: info?.vendor ?? '',
    architecture: info?.architecture ?? '',
    device: info?.device ?? '',
    description: info?.description ?? '',
    isFallbackAdapter: Boolean(info?.isFallbackAdapter),
  };
  let kernelProfile: KernelProfile;
  let kernelProfileSource: KernelProfileSource;
  const forced = options.kernelProfile ?? 'auto';
  const fromInfo = profileFromInfo(identity);
  if (forced !== 'auto') {
    kernelProfile = forced;
    kernelProfileSource = 'forced';
  } else if (fromInfo) {
    kernelProfile = fromInfo;
    kernelProfileSource = 'adapter info';
  } else {
    kernelProfile = (await measureKernelProfile(device)).profile;
    kernelProfileSource = 'measured';
  }
  const stagingOption = options.matmulStaging ?? 'auto';
  let matmulStaging: MatmulStaging = stagingOption === 'auto' ? 'workgroup' : stagingOption;
  if (stagingOption === 'auto' && kernelProfile === 'cpu') {
    const known = stagingFromInfo(identity);
    // A probe that cannot run leaves the tiles every adapter can take: speed, not correctness.
    matmulStaging =
      known ??
      (await measureMatmulStaging(device).then(
        (m) => m.staging,
        () => 'workgroup' as const,
      ));
  }
  // Subgroup reductions assume a layout WGSL does not promise: measure it (subgroups.ts).
  const subgroupLayout = wanted.includes('subgroups' as GPUFeatureName)
    ? await measureSubgroupLayout(device, Math.min(256, device.limits.maxComputeInvocationsPerWorkgroup))
    : undefined;
  const subgroups = subgroupLayout?.contiguous ?? false;
  return new GpuContext({
    device,
    label,
    keepAlive,
    adapterLimits: requiredLimits,
    onUncapturedError: options.onUncapturedError,
    kernelProfile,
    kernelProfileSource,
    matmulStaging,
    adapter: {
      ...identity,
      featureLevel,
      runtime,
      softwareFallback,
    },
    features: {
      shaderF16,
      timestampQuery: wanted.includes('timestamp-query'),
      subgroups,
      subgroupSize: subgroups ? (subgroupLayout?.size ?? 0) : 0,
    },
  });
}

/** One line naming the adapter, for logs and benchmark records. */
export function describeAdapter(ctx: GpuContext): string {
  const a = ctx.adapter;
  const name =
    [a.vendor, a.architecture, a.description].filter((s) => s && s.length > 0).join(' ') ||
    (a.featureLevel === 'compatibility' ? 'compatibility adapter' : 'unknown adapter');
  const extras = [
    a.runtime,
    a.featureLevel === 'compatibility' ? 'compat' : '',
    a.isFallbackAdapter ? 'fallback' : '',
    ctx.features.shaderF16 ? 'f16' : '',
    ctx.features.subgroups ? `subgroups ${ctx.features.subgroupSize}` : '',
    `${ctx.kernelProfile} kernels${ctx.kernelProfileSource === 'adapter info' ? '' : ` (${ctx.kernelProfileSource})`}`,
    ctx.matmulStaging === 'direct' ? 'direct matmul' : '',
  ].filter(Boolean);
  return `${name} (${extras.join(', ')})`;
}
