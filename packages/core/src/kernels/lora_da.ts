import source from '../../../../shaders/lora_da.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { isCpuAdapter } from './matmul.js';

const SPEC: KernelSpec = {
  source,
  file: 'shaders/lora_da.wgsl',
  entryPoint: 'lora_da_many',
  bindings: ['uniform', 'read', 'read', 'write'],
};

/** Modules one lora_da_many dispatch takes (the roles array of lora_da.wgsl's Params). */
export const LORA_DA_MAX_ROLES = 256;

/** Bytes of a lora_da_many dispatch's parameters: 32 of shape, 32 per role. */
export const LORA_DA_UNIFORM_BYTES = 32 + 32 * LORA_DA_MAX_ROLES;

/** One adapted module's dA = s·gᵀ·x, left for planLoraDaMany by the backward. */
export interface LoraDaModule {
  /** The module's input, T×N, as the forward saved it. */
  readonly x: Tensor;
  /** Its g = dy·B, T×R. */
  readonly g: Tensor;
  /** Its dA, R×N: written, or accumulated into with beta = 1. */
  readonly da: Tensor;
  /** The module's LoRA scale s. */
  readonly scale: number;
}

/**
 * Why lora_da_many cannot take these modules as they lie, or undefined when it can: their x must be
 * places of one buffer, their g of another and their dA of a third (each bound whole, within the
 * device's binding size), the dA places apart, and at most LORA_DA_MAX_ROLES modules.
 */
export function loraDaManyRefusal(ctx: GpuContext, modules: readonly LoraDaModule[]): string | undefined {
  const first = modules[0];
  if (!first) return 'no modules';
  if (modules.length > LORA_DA_MAX_ROLES) return `${modules.length} modules, at most ${LORA_DA_MAX_ROLES}`;
  const max = ctx.limits.maxStorageBufferBindingSize;
  for (const [what, of] of [
    ['x', (m: LoraDaModule) => m.x],
    ['g', (m: LoraDaModule) => m.g],
    ['dA', (m: LoraDaModule) => m.da],
  ] as const) {
    const buffer = of(first).buffer;
    const other = modules.find((m) => of(m).buffer !== buffer);
    if (other) return `${what} ${of(other).label} is not in ${of(first).label}'s buffer`;
    if (buffer.size > max)
      return `${what}'s buffer ${buffer.label} (${buffer.size} bytes) exceeds maxStorageBufferBindingSize ${max}`;
  }
  if (first.da.buffer === first.x.buffer || first.da.buffer === first.g.buffer)
    return `dA ${first.da.label} shares a buffer with the x or g it reads`;
  const spans = modules
    .map((m) => [m.da.byteOffset, m.da.byteOffset + m.da.byteLength, m.da.label] as const)
    .sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < spans.length; i++) {
    const [s, , label] = spans[i] as (typeof spans)[number];
    const prev = spans[i - 1] as (typeof spans)[number];
    if (s < prev[1]) return `dA ${label} overlaps ${prev[2]}`;
  }
  return undefined;
}

/**
 * dA_i = s_i·g_iᵀ·x_i (+ beta·dA_i) for many modules in one dispatch (lora_da_many): what the
 * backward leaves until a chunk of layers is done (loraDaChunks), so that it costs one dispatch
 * instead of one per module (or shared-input group) per layer. Refused, with the reason, where
 * loraDaManyRefusal says so.
 */
export async function planLoraDaMany(
  ctx: GpuContext,
  modules: readonly LoraDaModule[],
  opts: {
    T: number;
    beta: number;
    label: string;
    /** The GPUs' work split: 64 invocations, V's rows staged in workgroup memory. Default on GPUs;
     * the CPU adapters' is 16 invocations reading V themselves. Tests run both on any adapter. */
    stage?: boolean;
  },
): Promise<Dispatch> {
  const { T, beta, label } = opts;
  const refusal = loraDaManyRefusal(ctx, modules);
  if (refusal) throw new ShapeError(`${label}: ${refusal}`);
  if (beta !== 0 && beta !== 1) throw new ShapeError(`${label}: beta ${beta} must be 0 or 1`);
  const dims = modules.map((m) => {
    const [R, N] = m.da.shape as [number, number];
    const ok = (t: Tensor, rows: number, cols: number) =>
      t.dtype === 'f32' && t.shape.length === 2 && t.shape[0] === rows && t.shape[1] === cols;
    if (!ok(m.da, R, N) || !ok(m.x, T, N) || !ok(m.g, T, R))
      throw new ShapeError(
        `${label}: x ${m.x.label} ${formatShape(m.x.shape)}, g ${m.g.label} ${formatShape(m.g.shape)} and dA ${m.da.label} ${formatShape(m.da.shape)} must be f32 ${T}×N, ${T}×R and R×N`,
      );
    if (!Number.isFinite(m.scale)) throw new ShapeError(`${label}: scale ${m.scale} of ${m.da.label} is not finite`);
    return { R, N };
  });
  const stage = opts.stage ?? !isCpuAdapter(ctx);
  const wg = Math.min(stage ? 64 : 16, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const aligned = modules.every((m, i) => (dims[i]?.N ?? 1) % 4 === 0 && (m.x.byteOffset / 4) % 4 === 0);
  const kernel = await getKernel(ctx, SPEC, { WG: wg, TT: 16, STAGE: stage, ALIGNED: aligned });
  let total = 0;
  const roles = modules.map((m, i) => {
    const { R, N } = dims[i] as { R: number; N: number };
    const gx = Math.ceil(N / (4 * wg));
    const role = { R, N, start: total, gx, m };
    total += gx * Math.ceil(R / 4);
    return role;
  });
  // bindKernel refuses a grid past the device's per-dimension limit.
  const gridX = Math.max(1, Math.min(total, ctx.limits.maxComputeWorkgroupsPerDimension));
  const gridY = Math.ceil(total / gridX);
  const fields: ['u32' | 'f32', number][] = [
    ['u32', T],
    ['u32', roles.length],
    ['u32', gridX],
    ['u32', total],
    ['f32', beta],
    ['u32', 0],
    ['u32', 0],
    ['u32', 0],
  ];
  for (let i = 0; i < LORA_DA_MAX_ROLES; i++) {
    const r = roles[i];
    fields.push(
      ['u32', r?.R ?? 0],
      ['u32', r?.N ?? 0],
      ['u32', r?.start ?? 0],
      ['u32', r?.gx ?? 0],
      ['u32', r ? r.m.x.byteOffset / 4 : 0],
      ['u32', r ? r.m.g.byteOffset / 4 : 0],
      ['u32', r ? r.m.da.byteOffset / 4 : 0],
      ['f32', r?.m.scale ?? 0],
    );
  }
  const first = modules[0] as LoraDaModule;
  return bindKernel(ctx, kernel, {
    label,
    resources: [first.x.buffer, first.g.buffer, first.da.buffer],
    workgroups: [gridX, gridY],
    uniforms: packUniforms(fields),
  });
}
