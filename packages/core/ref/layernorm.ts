/**
 * Float64 reference of layer normalisation over rows of length d, from the definition
 *   y[r,i] = (x[r,i] − μ_r) / sqrt(σ²_r + eps) · w[i] + b[i],   μ = mean x, σ² = mean (x − μ)²
 * and its gradient with respect to x (w and b are frozen). Rows packed back to back: [rows, d].
 */

export interface LayerNormRefInput {
  rows: number;
  d: number;
  x: ArrayLike<number>;
  w: ArrayLike<number>;
  b?: ArrayLike<number>;
  eps: number;
}

export function layernormForwardRef(p: LayerNormRefInput): { y: Float64Array; mean: Float64Array; rstd: Float64Array } {
  const { rows, d } = p;
  const y = new Float64Array(rows * d);
  const mean = new Float64Array(rows);
  const rstd = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let mu = 0;
    for (let i = 0; i < d; i++) mu += p.x[r * d + i] as number;
    mu /= d;
    let v = 0;
    for (let i = 0; i < d; i++) v += ((p.x[r * d + i] as number) - mu) ** 2;
    const s = 1 / Math.sqrt(v / d + p.eps);
    mean[r] = mu;
    rstd[r] = s;
    for (let i = 0; i < d; i++) {
      y[r * d + i] = ((p.x[r * d + i] as number) - mu) * s * (p.w[i] as number) + (p.b ? (p.b[i] as number) : 0);
    }
  }
  return { y, mean, rstd };
}

/**
 * ∂L/∂x given dy. With x̂ = (x − μ)·s and g = dy ∘ w, differentiating μ and s through x gives
 *   dx_j = s · (g_j − mean(g) − x̂_j · mean(g ∘ x̂)).
 */
export function layernormBackwardRef(p: LayerNormRefInput, dy: ArrayLike<number>): { dx: Float64Array } {
  const { rows, d } = p;
  const { mean, rstd } = layernormForwardRef(p);
  const dx = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) {
    const mu = mean[r] as number;
    const s = rstd[r] as number;
    let gMean = 0;
    let gxMean = 0;
    for (let i = 0; i < d; i++) {
      const g = (dy[r * d + i] as number) * (p.w[i] as number);
      gMean += g;
      gxMean += g * ((p.x[r * d + i] as number) - mu) * s;
    }
    gMean /= d;
    gxMean /= d;
    for (let j = 0; j < d; j++) {
      const k = r * d + j;
      const g = (dy[k] as number) * (p.w[j] as number);
      dx[k] = s * (g - gMean - ((p.x[k] as number) - mu) * s * gxMean);
    }
  }
  return { dx };
}
