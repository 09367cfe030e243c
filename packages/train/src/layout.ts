/**
 * The buffers LoraTrainer allocates around its forward and backward plans, described once: the
 * trainer allocates from these functions and estimateMemory sums them.
 */
import {
  arenaLayout,
  type GpuContext,
  reducePlanFor,
  type Shape,
  type TileMath,
  trainingTileMath,
} from '@webtune/core';
import type { WeightPrecision } from '@webtune/models';

/**
 * The tile math a training run takes unless asked otherwise (TrainerOptions.tileMath): f32 for a
 * model loaded with f32 weights (who asks for f32 weights asks for f32 arithmetic, as generation
 * has it), else trainingTileMath's (f16 on GPUs with shader-f16); f32 without a device. 'f16' is
 * the forward's products and, under a dynamic loss scale, the backward's.
 */
export function defaultTrainingTileMath(ctx: GpuContext | undefined, precision: WeightPrecision): TileMath {
  return precision === 'f32' || !ctx ? 'f32' : trainingTileMath(ctx);
}

/** A buffer (or `count` alike) the trainer allocates. */
export interface TrainerBuffer {
  readonly label: string;
  readonly shape: readonly number[];
  readonly dtype: 'f32' | 'i32' | 'u32';
  readonly count: number;
}

/** Report buffers made up front: one for the step being read, one for the step queued behind it. */
export const REPORT_BUFFERS = 2;

/**
 * Bytes of a step's report (see LoraTrainer.submitStep): per micro-batch [loss, count] f32, then
 * the gradient norm's [norm, finite, non-finite count] f32, the AdamW latch u32, the loss's label
 * errors u32 [2] and, where the loss is scaled, the loss scale's state f32 [4] (core's
 * LOSS_SCALE_STATE_SIZE; zeros otherwise).
 */
export function reportBytes(K: number): number {
  return Math.ceil((8 * K + 40) / 16) * 16;
}

/** Where in a step's report (see reportBytes) each part starts, in bytes. */
export function reportOffsets(K: number): { norm: number; latch: number; errors: number; lossScale: number } {
  return { norm: 8 * K, latch: 8 * K + 12, errors: 8 * K + 16, lossScale: 8 * K + 24 };
}

/** The four LoRA arenas' layout (params, grads, AdamW m and v: identical): A then B per module. */
export function loraArenaLayout(
  modules: readonly { readonly aShape: Shape; readonly bShape: Shape }[],
  minStorageBufferOffsetAlignment: number,
): { offsets: number[]; elements: number } {
  return arenaLayout(
    modules.flatMap((m) => [m.aShape, m.bShape]),
    minStorageBufferOffsetAlignment,
  );
}

/**
 * Everything else the trainer allocates: each micro-batch's ids and targets (and with LoRA dropout
 * its mask counter), the loss log, the gradient norm and its partial sums, AdamW's divergence
 * latch, with a scaled loss (an f16 backward) the loss scale's state, and the mappable step
 * reports.
 */
export function trainerBuffers(
  K: number,
  rows: number,
  gradientElements: number,
  limits: Parameters<typeof reducePlanFor>[0],
  cpuAdapter: boolean,
  dropout = false,
  lossScale = false,
): TrainerBuffer[] {
  return [
    { label: 'train.ids.{k}', shape: [rows], dtype: 'i32', count: K },
    // LoRA dropout: the counter its masks hash (seed, step, micro-batch), and each micro-batch's.
    ...(dropout
      ? [
          { label: 'train.dropout_counter', shape: [4], dtype: 'u32', count: 1 } as const,
          { label: 'train.dropout.{k}', shape: [4], dtype: 'u32', count: K } as const,
        ]
      : []),
    { label: 'train.targets.{k}', shape: [rows], dtype: 'i32', count: K },
    { label: 'train.loss_log', shape: [K, 2], dtype: 'f32', count: 1 },
    { label: 'train.grad_norm', shape: [3], dtype: 'f32', count: 1 },
    { label: 'train.adamw_latch', shape: [1], dtype: 'u32', count: 1 },
    ...(lossScale ? [{ label: 'train.loss_scale', shape: [4], dtype: 'f32', count: 1 } as const] : []),
    {
      label: 'train.grad_norm_partials',
      shape: [reducePlanFor(limits, cpuAdapter, gradientElements).partialsSize],
      dtype: 'f32',
      count: 1,
    },
    { label: 'train.report.{i}', shape: [reportBytes(K) / 4], dtype: 'u32', count: REPORT_BUFFERS },
  ];
}
