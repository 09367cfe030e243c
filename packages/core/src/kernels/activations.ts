import actMath from '../../../../shaders/act_math.wgsl?raw';
import activations from '../../../../shaders/activations.wgsl?raw';

// The element formulas come first (shaders/act_math.wgsl, shared with matmul.wgsl's epilogues).
const source = `${actMath}\n${activations}`;

import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import type { Tensor } from '../tensor.js';
import { grid1d } from './elementwise.js';

type Entry = 'silu_mul_fwd' | 'silu_mul_bwd' | 'gelu_new_fwd' | 'gelu_new_bwd';

const BINDINGS: Record<Entry, KernelSpec['bindings']> = {
  silu_mul_fwd: ['uniform', 'read', 'read', 'write'],
  silu_mul_bwd: ['uniform', 'read', 'read', 'read', 'write', 'write'],
  gelu_new_fwd: ['uniform', 'read', 'write'],
  gelu_new_bwd: ['uniform', 'read', 'read', 'write'],
};

/**
 * Checks that every operand is f32 with the same number of elements, and that each buffer holds
 * whole vec4s (the kernels read and write 16 bytes at a time; tensors' buffers are rounded up to
 * 16 bytes, so the last vec4 only ever touches the tensor's own padding).
 */
function checkOperands(op: string, operands: readonly (readonly [string, Tensor])[]): number {
  const [, first] = operands[0] as readonly [string, Tensor];
  const n = first.size;
  for (const [name, t] of operands) {
    if (t.dtype !== 'f32' || t.size !== n) {
      throw new ShapeError(
        `${op}: ${name} ${t.label} ${t.dtype}${formatShape(t.shape)} must be f32 with ${n} elements like ${first.label} ${formatShape(first.shape)}`,
      );
    }
    if (t.buffer.size < Math.ceil(n / 4) * 16) {
      throw new ShapeError(`${op}: ${name} ${t.label}'s buffer (${t.buffer.size} bytes) does not hold whole vec4s`);
    }
  }
  return n;
}

async function plan(
  ctx: GpuContext,
  entry: Entry,
  operands: readonly (readonly [string, Tensor])[],
  label: string,
): Promise<Dispatch> {
  const n = checkOperands(label, operands);
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const kernel = await getKernel(
    ctx,
    { source, file: 'shaders/act_math.wgsl + shaders/activations.wgsl', entryPoint: entry, bindings: BINDINGS[entry] },
    { WG: wg },
  );
  const n4 = Math.ceil(n / 4);
  const grid = grid1d(ctx, n4, wg);
  return bindKernel(ctx, kernel, {
    label,
    resources: operands.map(([, t]) => t),
    workgroups: grid.workgroups,
    uniforms: packUniforms([
      ['u32', n4],
      ['u32', grid.rowStride],
    ]),
  });
}

/** out = silu(gate) · up for gate, up [rows, I] (the outputs of gate_proj and up_proj). */
export function planSiluMulForward(
  ctx: GpuContext,
  io: { readonly gate: Tensor; readonly up: Tensor; readonly out: Tensor },
  label = 'silu_mul',
): Promise<Dispatch> {
  return plan(
    ctx,
    'silu_mul_fwd',
    [
      ['gate', io.gate],
      ['up', io.up],
      ['out', io.out],
    ],
    label,
  );
}

/** dgate, dup (both written) from dout and the forward's inputs gate and up; silu is recomputed. */
export function planSiluMulBackward(
  ctx: GpuContext,
  io: {
    readonly gate: Tensor;
    readonly up: Tensor;
    readonly dout: Tensor;
    readonly dgate: Tensor;
    readonly dup: Tensor;
  },
  label = 'silu_mul',
): Promise<Dispatch> {
  return plan(
    ctx,
    'silu_mul_bwd',
    [
      ['gate', io.gate],
      ['up', io.up],
      ['dout', io.dout],
      ['dgate', io.dgate],
      ['dup', io.dup],
    ],
    `${label}.backward`,
  );
}

/** y = gelu_new(x), GPT-2's tanh approximation. x must be kept for the backward. */
export function planGeluNewForward(
  ctx: GpuContext,
  io: { readonly x: Tensor; readonly y: Tensor },
  label = 'gelu_new',
): Promise<Dispatch> {
  return plan(
    ctx,
    'gelu_new_fwd',
    [
      ['x', io.x],
      ['y', io.y],
    ],
    label,
  );
}

/** dx (written) from dy and the forward's saved input x. */
export function planGeluNewBackward(
  ctx: GpuContext,
  io: { readonly x: Tensor; readonly dy: Tensor; readonly dx: Tensor },
  label = 'gelu_new',
): Promise<Dispatch> {
  return plan(
    ctx,
    'gelu_new_bwd',
    [
      ['x', io.x],
      ['dy', io.dy],
      ['dx', io.dx],
    ],
    `${label}.backward`,
  );
}
