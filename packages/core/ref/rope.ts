/**
 * Float64 reference of rotary position embedding in Hugging Face's rotate_half convention, on
 * x [rows, nHeads·headDim] (rows = B·T, row r at position pos0 + r % T unless `positions` gives
 * one per row). Within each head, element i < headDim/2 pairs with i + headDim/2:
 *   out = x·cos(θ) + rotate_half(x)·sin(θ),  rotate_half(x) = (−x[half:], x[:half]),
 *   θ_i = pos · invFreq[i]
 * θ is rounded to f32 (HF forms it with an f32 matmul), cos and sin are then taken in float64
 * and multiplied by the attention scaling.
 */

export interface RopeRefInput {
  rows: number;
  T: number;
  nHeads: number;
  headDim: number;
  pos0: number;
  positions?: ArrayLike<number>;
  invFreq: ArrayLike<number>;
  attentionScaling?: number;
  x: ArrayLike<number>;
}

function apply(p: RopeRefInput, v: ArrayLike<number>, transpose: boolean): Float64Array {
  const { rows, T, nHeads, headDim } = p;
  const half = headDim / 2;
  const width = nHeads * headDim;
  const scale = p.attentionScaling ?? 1;
  const out = new Float64Array(rows * width);
  for (let r = 0; r < rows; r++) {
    const pos = p.positions ? (p.positions[r] as number) : p.pos0 + (r % T);
    for (let h = 0; h < nHeads; h++) {
      for (let i = 0; i < half; i++) {
        const theta = Math.fround(pos * (p.invFreq[i] as number));
        const c = Math.cos(theta) * scale;
        const s = Math.sin(theta) * scale * (transpose ? -1 : 1);
        const a = r * width + h * headDim + i;
        const b = a + half;
        const va = v[a] as number;
        const vb = v[b] as number;
        out[a] = va * c - vb * s;
        out[b] = vb * c + va * s;
      }
    }
  }
  return out;
}

export function ropeForwardRef(p: RopeRefInput): { y: Float64Array } {
  return { y: apply(p, p.x, false) };
}

/** ∂L/∂x given dy: the forward is linear in x with a block matrix [[c, −s], [s, c]] per pair, so
 * the gradient is its transpose [[c, s], [−s, c]] applied to dy. */
export function ropeBackwardRef(p: RopeRefInput, dy: ArrayLike<number>): { dx: Float64Array } {
  return { dx: apply(p, dy, true) };
}
