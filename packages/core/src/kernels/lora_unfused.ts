/**
 * The LoRA layer computed the plain way, one product per dispatch, each by our own tiled matmul,
 * then an add. It exists as the benchmark baseline that measures what fusion buys (and is tested
 * like every other kernel, so the comparison is between two correct things).
 */
import type { GpuContext } from '../context.js';
import { type KernelPlan, kernelPlan } from '../kernel.js';
import { createTensor, type Tensor } from '../tensor.js';
import { planAddScaled } from './elementwise.js';
import {
  type LoraBackwardBuffers,
  type LoraForwardBuffers,
  type LoraLayer,
  loraShape,
  planLoraWeightGrad,
} from './lora_matmul.js';
import { planMatmul } from './matmul.js';

/** The unfused plans own their temporaries, like every multi-dispatch plan. */
export type UnfusedPlan = KernelPlan;

/** y0 = x·W0ᵀ + bias; h = x·Aᵀ; t = h·Bᵀ; y = y0 + s·t. Four dispatches, two T×out temporaries. */
export async function planLoraForwardUnfused(
  ctx: GpuContext,
  layer: LoraLayer,
  io: LoraForwardBuffers,
  label = 'lora_unfused',
): Promise<UnfusedPlan> {
  const s = loraShape(layer, io.x, label);
  const y0 = createTensor(ctx, [s.T, s.outF], 'f32', `${label}.y0`);
  const t = createTensor(ctx, [s.T, s.outF], 'f32', `${label}.t`);
  const dispatches = [
    await planMatmul(ctx, io.x, layer.w0, y0, { bias: layer.bias, label: `${label}.xW0` }),
    await planMatmul(ctx, io.x, layer.a, io.h, { label: `${label}.xA` }),
    await planMatmul(ctx, io.h, layer.b, t, { label: `${label}.hB` }),
    await planAddScaled(ctx, y0, t, io.y, layer.scale, `${label}.add`),
  ];
  return kernelPlan(dispatches, [y0, t]);
}

/** g = dy·B; dB = s·dyᵀ·h; dA = s·gᵀ·x (as fused); dx0 = dy·W0; dx1 = g·A; dx = dx0 + s·dx1. Six dispatches. */
export async function planLoraBackwardUnfused(
  ctx: GpuContext,
  layer: LoraLayer,
  io: LoraBackwardBuffers & { dx: Tensor },
  label = 'lora_unfused',
): Promise<UnfusedPlan> {
  const s = loraShape(layer, io.x, label);
  const dx0 = createTensor(ctx, [s.T, s.inF], 'f32', `${label}.dx0`);
  const dx1 = createTensor(ctx, [s.T, s.inF], 'f32', `${label}.dx1`);
  const dispatches = [
    await planMatmul(ctx, io.dy, layer.b, io.g, { transW: false, label: `${label}.dyB` }),
    // The weight gradients reduce over tokens, which a square-tiled matmul cannot do well: both
    // variants use the same reduction kernel, so the ratio measures the fusion alone.
    await planLoraWeightGrad(
      ctx,
      io.dy,
      io.h,
      io.db,
      { T: s.T, N: s.outF, R: s.r },
      true,
      layer.scale,
      0,
      `${label}.dB`,
    ),
    await planLoraWeightGrad(
      ctx,
      io.x,
      io.g,
      io.da,
      { T: s.T, N: s.inF, R: s.r },
      false,
      layer.scale,
      0,
      `${label}.dA`,
    ),
    await planMatmul(ctx, io.dy, layer.w0, dx0, { transW: false, label: `${label}.dyW0` }),
    await planMatmul(ctx, io.g, layer.a, dx1, { transW: false, label: `${label}.gA` }),
    await planAddScaled(ctx, dx0, dx1, io.dx, layer.scale, `${label}.add`),
  ];
  return kernelPlan(dispatches, [dx0, dx1]);
}
