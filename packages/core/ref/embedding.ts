/**
 * Float64 reference of the embedding gather: out[t] = E[ids[t]] + wpe[pos_t] (wpe optional),
 * pos_t = pos0 + t % T unless `positions` gives one per token. An id or position out of range
 * gives a zero row and is reported (the kernel's contract; see shaders/embedding.wgsl).
 */

export interface EmbeddingRefInput {
  ids: ArrayLike<number>;
  vocab: number;
  d: number;
  table: ArrayLike<number>;
  wpe?: { maxPos: number; data: ArrayLike<number> };
  T: number;
  pos0: number;
  positions?: ArrayLike<number>;
}

export function embeddingForwardRef(p: EmbeddingRefInput): {
  out: Float64Array;
  badIds: number;
  badPositions: number;
  zeroRows: number;
} {
  const { d } = p;
  const rows = p.ids.length;
  const out = new Float64Array(rows * d);
  let badIds = 0;
  let badPositions = 0;
  let zeroRows = 0;
  for (let t = 0; t < rows; t++) {
    const id = p.ids[t] as number;
    const pos = p.positions ? (p.positions[t] as number) : p.pos0 + (t % p.T);
    const idOk = Number.isInteger(id) && id >= 0 && id < p.vocab;
    const posOk = !p.wpe || (pos >= 0 && pos < p.wpe.maxPos);
    if (!idOk) badIds++;
    if (!posOk) badPositions++;
    if (!idOk || !posOk) {
      zeroRows++;
      continue;
    }
    for (let c = 0; c < d; c++) {
      out[t * d + c] = (p.table[id * d + c] as number) + (p.wpe ? (p.wpe.data[pos * d + c] as number) : 0);
    }
  }
  return { out, badIds, badPositions, zeroRows };
}
