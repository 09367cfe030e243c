/**
 * A table of many rows (a token embedding, an LM head) kept as consecutive blocks of whole rows,
 * each its own buffer, when the whole table is larger than a storage binding (or a buffer) may be
 * on this device: Qwen2.5's 151,936 × 1536 f16 embedding is 445 MiB, and WebGPU's default
 * maxStorageBufferBindingSize is 128 MiB. The kernels that read tables (embedding.ts, the chunked
 * loss and the logits in cross_entropy.ts) run once per part with the part's first row.
 *
 * A table that fits stays one plain Tensor: `RowTable` is either, and `tableParts` lists the parts
 * of both the same way.
 */
import type { GpuContext } from './context.js';
import { ShapeError } from './errors.js';
import { formatShape, type Shape } from './shape.js';
import { bytesPerElement, createTensor, type DType, type Tensor } from './tensor.js';

/** Rows per part are a multiple of this: loss chunks start at rows that are multiples of 4. */
const PART_ROW_MULTIPLE = 4;

/** Consecutive blocks of the rows of one [rows, cols] matrix, each a tensor [rowsᵢ, cols]. */
export class SplitRows {
  readonly shape: Shape;
  readonly dtype: DType;
  /** The first row of each part. */
  readonly starts: readonly number[];

  constructor(
    readonly parts: readonly Tensor[],
    readonly label: string,
  ) {
    const first = parts[0];
    if (!first) throw new ShapeError(`${label}: a split table needs at least one part`);
    const cols = first.shape[1] as number;
    const starts: number[] = [];
    let rows = 0;
    for (const p of parts) {
      if (p.shape.length !== 2 || p.shape[1] !== cols || p.dtype !== first.dtype) {
        throw new ShapeError(
          `${label}: part ${p.label} ${p.dtype}${formatShape(p.shape)} does not match ${first.dtype}[*, ${cols}]`,
        );
      }
      starts.push(rows);
      rows += p.shape[0] as number;
    }
    this.shape = [rows, cols];
    this.dtype = first.dtype;
    this.starts = starts;
  }

  get size(): number {
    return (this.shape[0] as number) * (this.shape[1] as number);
  }

  get byteLength(): number {
    return this.parts.reduce((n, p) => n + p.byteLength, 0);
  }

  dispose(): void {
    for (const p of this.parts) p.dispose();
  }
}

/** A [rows, cols] matrix: one tensor, or split by rows. */
export type RowTable = Tensor | SplitRows;

/** One part of a table: a tensor holding rows [start, start + rows). */
export interface TablePart {
  readonly tensor: Tensor;
  readonly start: number;
  readonly rows: number;
}

export function tableParts(t: RowTable): readonly TablePart[] {
  if (t instanceof SplitRows) {
    return t.parts.map((tensor, i) => ({ tensor, start: t.starts[i] as number, rows: tensor.shape[0] as number }));
  }
  return [{ tensor: t, start: 0, rows: t.shape[0] as number }];
}

/** The tensors of a table (to own and dispose). */
export function tableTensors(t: RowTable): readonly Tensor[] {
  return t instanceof SplitRows ? t.parts : [t];
}

/** The largest bytes one part may take on a device with these limits. */
export function tablePartLimit(limits: { maxStorageBufferBindingSize: number; maxBufferSize: number }): number {
  return Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
}

/**
 * Rows of each part of a [rows, cols] `dtype` table whose parts may take at most `maxBytes` each
 * (buffers are rounded up to 16 bytes): one part when the table fits, else as few equal parts as
 * fit, each a multiple of 4 rows but the last. The loader and the memory estimate both use it.
 */
export function splitRowCounts(rows: number, cols: number, dtype: DType, maxBytes: number): number[] {
  const rowBytes = cols * bytesPerElement(dtype);
  const bytes = (n: number) => Math.ceil((n * rowBytes) / 16) * 16;
  if (bytes(rows) <= maxBytes) return [rows];
  const fit = Math.floor(maxBytes / rowBytes / PART_ROW_MULTIPLE) * PART_ROW_MULTIPLE;
  if (fit < PART_ROW_MULTIPLE) {
    throw new ShapeError(
      `a table of ${cols} ${dtype} columns cannot be split into parts of ${maxBytes} bytes: ${PART_ROW_MULTIPLE} rows take ${PART_ROW_MULTIPLE * rowBytes}`,
    );
  }
  // As few parts as fit, with their rows evened out (a multiple of 4).
  const parts = Math.ceil(rows / fit);
  const per = Math.ceil(rows / parts / PART_ROW_MULTIPLE) * PART_ROW_MULTIPLE;
  const counts: number[] = [];
  for (let start = 0; start < rows; start += per) counts.push(Math.min(per, rows - start));
  return counts;
}

/**
 * Allocates a [rows, cols] table, split by rows when it is larger than the device lets one
 * binding be (parts labelled `label[start:end]`). Each part is created as its own tensor.
 */
export function createRowTable(ctx: GpuContext, shape: Shape, dtype: DType, label: string): RowTable {
  if (shape.length !== 2) throw new ShapeError(`${label}: a table must be 2-D, got ${formatShape(shape)}`);
  const [rows, cols] = shape as [number, number];
  const counts = splitRowCounts(rows, cols, dtype, tablePartLimit(ctx.limits));
  if (counts.length === 1) return createTensor(ctx, shape, dtype, label);
  const parts: Tensor[] = [];
  try {
    let start = 0;
    for (const n of counts) {
      parts.push(createTensor(ctx, [n, cols], dtype, `${label}[${start}:${start + n}]`));
      start += n;
    }
  } catch (e) {
    for (const p of parts) p.dispose();
    throw e;
  }
  return new SplitRows(parts, label);
}
