import source from '../../../../shaders/embedding.wgsl?raw';
import type { GpuContext } from '../context.js';
import { ShapeError } from '../errors.js';
import { bindKernel, type Dispatch, getKernel, type KernelSpec, packUniforms } from '../kernel.js';
import { formatShape } from '../shape.js';
import { type RowTable, type TablePart, tableParts } from '../table.js';
import type { Tensor } from '../tensor.js';
import { grid1d } from './elementwise.js';

const spec = (entryPoint: 'embedding_fwd' | 'embedding_fwd_f16'): KernelSpec => ({
  source,
  file: 'shaders/embedding.wgsl',
  entryPoint,
  bindings: ['uniform', 'read', 'read', 'read', 'read', 'write', 'write'],
});

/** Bits of errors[0] after an embedding dispatch (errors[1] counts the zeroed rows). */
export const EMBEDDING_ID_OUT_OF_RANGE = 1;
export const EMBEDDING_POSITION_OUT_OF_RANGE = 2;

export interface EmbeddingBuffers {
  /** [rows] i32 token ids, rows = B·T. */
  readonly ids: Tensor;
  /** E [vocab, d], f32 or f16; frozen. */
  readonly table: Tensor;
  /** GPT-2's learned position embedding [maxPos, d], same dtype as the table; frozen. */
  readonly wpe?: Tensor;
  /** [rows] i32 positions for wpe, replacing pos0 + t % T (packed sequences, decoding). */
  readonly positions?: Tensor;
  /** [rows, d] f32, written. */
  readonly out: Tensor;
  /**
   * At least 2 u32, accumulated: errors[0] |= EMBEDDING_ID_OUT_OF_RANGE /
   * EMBEDDING_POSITION_OUT_OF_RANGE, errors[1] += rows zeroed. Clear it before the first step
   * (StepEncoder.clear) and read it back when convenient: the host validates ids before upload,
   * so anything nonzero is a bug upstream.
   */
  readonly errors: Tensor;
}

export interface EmbeddingOptions {
  /** Tokens per sequence, for positions pos0 + t % T. Default: every row (B = 1). */
  readonly T?: number;
  /** Position of each sequence's first token. Default 0. */
  readonly pos0?: number;
  readonly label?: string;
}

/**
 * out[t] = E[ids[t]] (+ wpe[pos0 + t % T]). Forward only: the tables are frozen and there is no
 * backward. An id (or position) out of range gives a zero row and a flag in `errors`, never an
 * out-of-bounds read. One dispatch.
 */
export async function planEmbeddingForward(
  ctx: GpuContext,
  io: EmbeddingBuffers,
  opts: EmbeddingOptions = {},
): Promise<Dispatch> {
  if (io.table.shape.length !== 2) {
    throw new ShapeError(
      `${opts.label ?? 'embedding'}: table ${io.table.label} must be 2-D [vocab, d], got ${formatShape(io.table.shape)}`,
    );
  }
  return planPart(ctx, io, { tensor: io.table, start: 0, rows: io.table.shape[0] as number }, opts);
}

/**
 * planEmbeddingForward over a table that may be split by rows (core's table.ts): one dispatch
 * per part, each writing the rows whose ids fall in it.
 */
export async function planEmbeddingTable(
  ctx: GpuContext,
  io: Omit<EmbeddingBuffers, 'table'> & { readonly table: RowTable },
  opts: EmbeddingOptions = {},
): Promise<Dispatch[]> {
  const parts = tableParts(io.table);
  const out: Dispatch[] = [];
  try {
    for (const part of parts) {
      const label =
        parts.length > 1 ? `${opts.label ?? 'embedding'}[${part.start}:${part.start + part.rows}]` : opts.label;
      out.push(
        await planPart(ctx, { ...io, table: part.tensor }, part, { ...opts, label }, io.table.shape[0] as number),
      );
    }
    return out;
  } catch (e) {
    for (const d of out) d.dispose();
    throw e;
  }
}

async function planPart(
  ctx: GpuContext,
  io: EmbeddingBuffers,
  part: TablePart,
  opts: EmbeddingOptions,
  vocabRows?: number,
): Promise<Dispatch> {
  const label = opts.label ?? 'embedding';
  const { ids, table, wpe, positions, out, errors } = io;
  if (table.shape.length !== 2) {
    throw new ShapeError(`${label}: table ${table.label} must be 2-D [vocab, d], got ${formatShape(table.shape)}`);
  }
  const d = table.shape[1] as number;
  const vocab = vocabRows ?? (table.shape[0] as number);
  if (table.dtype !== 'f32' && table.dtype !== 'f16') {
    throw new ShapeError(`${label}: table ${table.label} must be f32 or f16, got ${table.dtype}`);
  }
  if (ids.dtype !== 'i32') throw new ShapeError(`${label}: ids ${ids.label} must be i32, got ${ids.dtype}`);
  const rows = ids.size;
  if (out.dtype !== 'f32' || out.size !== rows * d || out.shape[out.shape.length - 1] !== d) {
    throw new ShapeError(
      `${label}: out ${out.label} ${out.dtype}${formatShape(out.shape)} must be f32 [${rows}, ${d}] (ids ${formatShape(ids.shape)}, table ${formatShape(table.shape)})`,
    );
  }
  if (errors.dtype !== 'u32' || errors.size < 2) {
    throw new ShapeError(
      `${label}: errors ${errors.label} ${errors.dtype}${formatShape(errors.shape)} must be ≥ 2 u32`,
    );
  }
  let maxPos = 0;
  if (wpe) {
    if (wpe.shape.length !== 2 || wpe.shape[1] !== d || wpe.dtype !== table.dtype) {
      throw new ShapeError(
        `${label}: wpe ${wpe.label} ${wpe.dtype}${formatShape(wpe.shape)} must be ${table.dtype} [maxPos, ${d}] like the table`,
      );
    }
    maxPos = wpe.shape[0] as number;
  }
  if (positions && (positions.dtype !== 'i32' || positions.size !== rows)) {
    throw new ShapeError(
      `${label}: positions ${positions.label} ${positions.dtype}${formatShape(positions.shape)} must be ${rows} i32 values`,
    );
  }
  const T = opts.T ?? rows;
  const pos0 = opts.pos0 ?? 0;
  if (!Number.isSafeInteger(T) || T < 1 || rows % T !== 0) {
    throw new ShapeError(`${label}: T = ${T} must divide the ${rows} ids`);
  }
  if (!Number.isSafeInteger(pos0) || pos0 < 0 || pos0 + T > 2 ** 31) {
    throw new ShapeError(`${label}: pos0 = ${pos0} must be a non-negative integer`);
  }
  const wg = Math.min(256, ctx.limits.maxComputeInvocationsPerWorkgroup);
  const kernel = await getKernel(ctx, spec(table.dtype === 'f16' ? 'embedding_fwd_f16' : 'embedding_fwd'), {
    WG: wg,
  });
  const grid = grid1d(ctx, rows * d, wg);
  const placeholder = ctx.placeholder();
  return bindKernel(ctx, kernel, {
    label,
    resources: [ids, table, wpe ?? placeholder, positions ?? placeholder, out, errors],
    workgroups: grid.workgroups,
    uniforms: packUniforms([
      ['u32', rows * d],
      ['u32', d],
      ['u32', vocab],
      ['u32', maxPos],
      ['u32', T],
      ['u32', pos0],
      ['u32', wpe ? 1 : 0],
      ['u32', positions ? 1 : 0],
      ['u32', grid.rowStride],
      ['u32', part.start],
      ['u32', part.rows],
    ]),
  });
}
