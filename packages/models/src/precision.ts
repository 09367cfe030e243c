/**
 * The precision of the frozen weights on the GPU, and which dtype each stored tensor gets at it.
 *
 *   f32    every matrix exact (parity tests)
 *   f16    every matrix rounded to f16 (the default)
 *   q8_0   linear modules' weights in llama.cpp's Q8_0 blocks, q4_0 likewise in Q4_0 (QLoRA's
 *          frozen base); the embedding, learned positions and the LM head stay f16 (they are read
 *          by row, by the embedding and loss kernels, not by the quantized matmul), and so does a
 *          linear weight whose input size is not a multiple of 32, as llama.cpp keeps such rows out
 *          of its blocks
 *
 * Norms and biases are f32 at every precision. loadModel and estimateMemory both ask
 * `storedDType`, so the plan and the allocation cannot disagree.
 */
import { type DType, isQuantFormat, QUANT_BLOCK } from '@webtune/core';
import type { ParamSpec } from './architecture.js';

export type WeightPrecision = 'f16' | 'f32' | 'q8_0' | 'q4_0';

export const WEIGHT_PRECISIONS: readonly WeightPrecision[] = ['f16', 'f32', 'q8_0', 'q4_0'];

export function isWeightPrecision(v: unknown): v is WeightPrecision {
  return typeof v === 'string' && (WEIGHT_PRECISIONS as readonly string[]).includes(v);
}

/** Why a tensor is not at the model's precision (undefined when it is). */
export type StoredAsReason = 'always f32' | 'embedding or LM head' | 'input size not a multiple of 32';

/** The GPU dtype of a parameter at `precision`, and why it differs when it does. */
export function storedAs(spec: ParamSpec, precision: WeightPrecision): { dtype: DType; reason?: StoredAsReason } {
  if (spec.precision === 'f32') return { dtype: 'f32', reason: precision === 'f32' ? undefined : 'always f32' };
  if (!isQuantFormat(precision)) return { dtype: precision };
  if (!spec.linear) return { dtype: 'f16', reason: 'embedding or LM head' };
  // Linear weights are [out, in] on the GPU (Conv1D's are transposed on upload): blocks run along in.
  const inFeatures = (spec.transpose ? spec.shape[0] : spec.shape[1]) as number;
  if (inFeatures % QUANT_BLOCK !== 0) return { dtype: 'f16', reason: 'input size not a multiple of 32' };
  return { dtype: precision };
}

export function storedDType(spec: ParamSpec, precision: WeightPrecision): DType {
  return storedAs(spec, precision).dtype;
}
