import type { GpuContext } from './context.js';
import type { StepEncoder } from './encoder.js';
import { LimitExceededError, ShaderCompileError, type ShaderMessage } from './errors.js';
import { Tensor } from './tensor.js';

/** How a kernel sees each binding of group 0, in binding order; 'none' leaves a binding number
 * out of the layout (an entry point that does not use it, where a binding more would pass the
 * device's storage-buffer limit). */
export type BindingKind = 'uniform' | 'read' | 'write' | 'none';

/** One entry point of one WGSL file, with its bind group layout spelled out. */
export interface KernelSpec {
  /** WGSL text, imported from shaders/ as a string. */
  readonly source: string;
  /** The file it came from, for error messages: 'shaders/matmul.wgsl'. */
  readonly file: string;
  readonly entryPoint: string;
  readonly bindings: readonly BindingKind[];
}

/** Values for the shader's `override` declarations (workgroup sizes, layout switches). */
export type OverrideConstants = Readonly<Record<string, number | boolean>>;

/** A compiled pipeline with its explicit layout. Cached per device: never built twice. */
export interface Kernel {
  readonly spec: KernelSpec;
  readonly constants: OverrideConstants;
  readonly pipeline: GPUComputePipeline;
  readonly layout: GPUBindGroupLayout;
  readonly label: string;
}

interface DeviceCache {
  modules: Map<string, Promise<GPUShaderModule>>;
  kernels: Map<string, Promise<Kernel>>;
}

// Keyed by device so a lost or destroyed device takes its pipelines with it.
const caches = new WeakMap<GPUDevice, DeviceCache>();

function cacheFor(device: GPUDevice): DeviceCache {
  let c = caches.get(device);
  if (!c) {
    c = { modules: new Map(), kernels: new Map() };
    caches.set(device, c);
  }
  return c;
}

async function compileModule(ctx: GpuContext, spec: KernelSpec): Promise<GPUShaderModule> {
  // The scope keeps a compile failure from also surfacing as an uncaptured validation error:
  // it is reported once, below, as a ShaderCompileError with its line.
  ctx.device.pushErrorScope('validation');
  const module = ctx.device.createShaderModule({ label: spec.file, code: spec.source });
  const info = await module.getCompilationInfo();
  const scoped = await ctx.device.popErrorScope();
  const errors: ShaderMessage[] = info.messages
    .filter((m) => m.type === 'error')
    .map((m) => ({ type: m.type, line: m.lineNum, column: m.linePos, message: m.message }));
  if (errors.length > 0) throw new ShaderCompileError(spec.file, errors, spec.source.split('\n'));
  if (scoped) throw new ShaderCompileError(spec.file, [{ type: 'error', line: 0, column: 0, message: scoped.message }]);
  return module;
}

function constantsKey(constants: OverrideConstants): string {
  return Object.keys(constants)
    .sort()
    .map((k) => `${k}=${String(constants[k])}`)
    .join(',');
}

/** Returns the pipeline for `spec` with these override constants, compiling it once per device. */
export function getKernel(ctx: GpuContext, spec: KernelSpec, constants: OverrideConstants = {}): Promise<Kernel> {
  ctx.assertAlive();
  const cache = cacheFor(ctx.device);
  const key = `${spec.file}#${spec.entryPoint}{${constantsKey(constants)}}`;
  let kernel = cache.kernels.get(key);
  if (!kernel) {
    let module = cache.modules.get(spec.source);
    if (!module) {
      module = compileModule(ctx, spec);
      cache.modules.set(spec.source, module);
      module.catch(() => cache.modules.delete(spec.source));
    }
    kernel = buildKernel(ctx, spec, constants, module, key);
    cache.kernels.set(key, kernel);
    kernel.catch(() => cache.kernels.delete(key));
  }
  return kernel;
}

async function buildKernel(
  ctx: GpuContext,
  spec: KernelSpec,
  constants: OverrideConstants,
  modulePromise: Promise<GPUShaderModule>,
  label: string,
): Promise<Kernel> {
  const module = await modulePromise;
  const layout = ctx.device.createBindGroupLayout({
    label: `${label} layout`,
    entries: spec.bindings.flatMap((kind, binding) =>
      kind === 'none'
        ? []
        : [
            {
              binding,
              visibility: 0x4 /* GPUShaderStage.COMPUTE */,
              buffer: { type: kind === 'uniform' ? 'uniform' : kind === 'read' ? 'read-only-storage' : 'storage' },
            } as const,
          ],
    ),
  });
  const numeric: Record<string, number> = {};
  for (const [k, v] of Object.entries(constants)) numeric[k] = typeof v === 'boolean' ? Number(v) : v;
  let pipeline: GPUComputePipeline;
  try {
    pipeline = await ctx.device.createComputePipelineAsync({
      label,
      layout: ctx.device.createPipelineLayout({ label: `${label} pipeline layout`, bindGroupLayouts: [layout] }),
      compute: { module, entryPoint: spec.entryPoint, constants: numeric },
    });
  } catch (cause) {
    const message = cause instanceof Error ? cause.message : String(cause);
    throw new ShaderCompileError(spec.file, [
      { type: 'error', line: 0, column: 0, message: `${spec.entryPoint}: ${message}` },
    ]);
  }
  return { spec, constants, pipeline, layout, label };
}

/** Packs a uniform struct of 4-byte scalars, in declaration order. */
export function packUniforms(fields: readonly (readonly ['u32' | 'i32' | 'f32', number])[]): ArrayBuffer {
  const bytes = new ArrayBuffer(Math.max(16, Math.ceil((fields.length * 4) / 16) * 16));
  const view = new DataView(bytes);
  fields.forEach(([type, value], i) => {
    if (type === 'f32') view.setFloat32(i * 4, value, true);
    else if (type === 'i32') view.setInt32(i * 4, value, true);
    else view.setUint32(i * 4, value, true);
  });
  return bytes;
}

export type Workgroups = readonly [number, number?, number?];

/**
 * A kernel bound to its buffers and parameters: made once when a step is planned, then recorded
 * into every step. Owns its uniform buffer; `dispose()` releases it.
 */
export class Dispatch {
  private released = false;

  constructor(
    readonly ctx: GpuContext,
    readonly kernel: Kernel,
    readonly bindGroup: GPUBindGroup,
    readonly workgroups: Workgroups,
    private readonly uniform: GPUBuffer | undefined,
    readonly label: string,
  ) {}

  record(pass: GPUComputePassEncoder): void {
    pass.setPipeline(this.kernel.pipeline);
    pass.setBindGroup(0, this.bindGroup);
    pass.dispatchWorkgroups(this.workgroups[0], this.workgroups[1] ?? 1, this.workgroups[2] ?? 1);
  }

  /** Rewrites the uniform parameters (for example the step number of an optimizer). */
  setUniforms(data: ArrayBuffer): void {
    if (!this.uniform) throw new Error(`${this.label} has no uniform buffer`);
    this.ctx.device.queue.writeBuffer(this.uniform, 0, data);
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    if (this.uniform) this.ctx.releaseBuffer(this.uniform);
  }
}

/** A tensor (bound at its place), a buffer (bound whole), or a byte range of a buffer (several
 * places of an arena bound as one operand; the offset a multiple of minStorageBufferOffsetAlignment). */
export type Resource =
  | Tensor
  | GPUBuffer
  | { readonly buffer: GPUBuffer; readonly offset: number; readonly size: number };

/**
 * Binds `resources` (everything but the uniform, in binding order) to `kernel`. The uniform, when
 * the kernel has one at binding 0, is made from `uniforms`. Checks workgroup counts against the
 * device limits here, so an oversized problem is a typed error and not a validation error.
 */
export function bindKernel(
  ctx: GpuContext,
  kernel: Kernel,
  args: { label: string; resources: readonly Resource[]; workgroups: Workgroups; uniforms?: ArrayBuffer },
): Dispatch {
  ctx.assertAlive();
  const max = ctx.limits.maxComputeWorkgroupsPerDimension;
  for (const n of args.workgroups) {
    if (n !== undefined && n > max) {
      throw new LimitExceededError('maxComputeWorkgroupsPerDimension', n, max, args.label);
    }
  }
  const hasUniform = kernel.spec.bindings[0] === 'uniform';
  // The binding number of each resource: every binding after the uniform but the 'none' ones.
  const slots: number[] = [];
  kernel.spec.bindings.forEach((kind, binding) => {
    if (kind !== 'uniform' && kind !== 'none') slots.push(binding);
  });
  const expected = slots.length;
  if (args.resources.length !== expected) {
    throw new Error(
      `${args.label}: ${args.resources.length} buffers bound, ${kernel.spec.entryPoint} takes ${expected}`,
    );
  }
  const bound = args.resources.map((r) => (r instanceof Tensor || 'offset' in r ? r.buffer : r));
  const entries: GPUBufferBinding[] = args.resources.map((r) =>
    r instanceof Tensor
      ? { buffer: r.buffer, offset: r.byteOffset, size: r.bindingSize }
      : 'offset' in r
        ? { buffer: r.buffer, offset: r.offset, size: r.size }
        : { buffer: r },
  );
  // WebGPU forbids a buffer written in a dispatch to be bound there read-only too, or written
  // twice over overlapping ranges (disjoint views of one arena may both be written).
  const kinds = slots.map((binding) => kernel.spec.bindings[binding] as BindingKind);
  const range = (e: GPUBufferBinding) => [e.offset ?? 0, (e.offset ?? 0) + (e.size ?? e.buffer.size)] as const;
  kinds.forEach((kind, i) => {
    if (kind !== 'write') return;
    const [a0, a1] = range(entries[i] as GPUBufferBinding);
    entries.forEach((other, j) => {
      if (j === i || other.buffer !== bound[i]) return;
      const [b0, b1] = range(other);
      if (kinds[j] !== 'write' || (a0 < b1 && b0 < a1)) {
        throw new Error(`${args.label}: ${(bound[i] as GPUBuffer).label} is written and also bound as another operand`);
      }
    });
  });
  let uniform: GPUBuffer | undefined;
  if (hasUniform) {
    const data = args.uniforms ?? new ArrayBuffer(16);
    uniform = ctx.createBuffer({
      label: `${args.label}.params`,
      size: data.byteLength,
      usage: 0x40 /* UNIFORM */ | 0x8 /* COPY_DST */,
    });
    ctx.device.queue.writeBuffer(uniform, 0, data);
  }
  const bindGroup = ctx.device.createBindGroup({
    label: args.label,
    layout: kernel.layout,
    entries: [
      ...(uniform ? [{ binding: 0, resource: { buffer: uniform } }] : []),
      ...entries.map((resource, i) => ({ binding: slots[i] as number, resource })),
    ],
  });
  return new Dispatch(ctx, kernel, bindGroup, args.workgroups, uniform, args.label);
}

/** Dispatches to record in order, with the scratch tensors they own: what a multi-dispatch plan
 * (the chunked loss, the unfused LoRA baseline) returns. */
export interface KernelPlan {
  readonly dispatches: readonly Dispatch[];
  /** Tensors the plan allocated; released by dispose(). */
  readonly scratch: readonly Tensor[];
  /** Bytes of the buffers in `scratch`. */
  readonly scratchBytes: number;
  /** Records every dispatch into `enc`. */
  record(enc: StepEncoder): void;
  dispose(): void;
}

export function kernelPlan(dispatches: readonly Dispatch[], scratch: readonly Tensor[]): KernelPlan {
  let released = false;
  return {
    dispatches,
    scratch,
    scratchBytes: scratch.reduce((s, t) => s + t.buffer.size, 0),
    record(enc: StepEncoder) {
      enc.dispatch(...dispatches);
    },
    dispose() {
      if (released) return;
      released = true;
      for (const d of dispatches) d.dispose();
      for (const t of scratch) t.dispose();
    },
  };
}
