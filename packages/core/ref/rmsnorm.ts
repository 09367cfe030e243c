/**
 * Float64 reference of RMS normalisation over rows of length d, from the definition
 *   y[r,i] = w[i] · x[r,i] / sqrt(mean_j x[r,j]² + eps)
 * and its gradient with respect to x (w is frozen). Rows packed back to back: [rows, d].
 */

export interface RmsNormRefInput {
  rows: number;
  d: number;
  x: ArrayLike<number>;
  w: ArrayLike<number>;
  eps: number;
}

export function rmsnormForwardRef(p: RmsNormRefInput): { y: Float64Array; rstd: Float64Array } {
  const { rows, d } = p;
  const y = new Float64Array(rows * d);
  const rstd = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let ms = 0;
    for (let i = 0; i < d; i++) ms += (p.x[r * d + i] as number) ** 2;
    const s = 1 / Math.sqrt(ms / d + p.eps);
    rstd[r] = s;
    for (let i = 0; i < d; i++) y[r * d + i] = (p.w[i] as number) * (p.x[r * d + i] as number) * s;
  }
  return { y, rstd };
}

/**
 * ∂L/∂x given dy = ∂L/∂y. With s = (m + eps)^(-1/2), m = mean x², ∂s/∂x_j = −s³·x_j/d, so
 *   dx_j = s·w_j·dy_j − (s³/d)·x_j·Σ_i dy_i·w_i·x_i.
 */
export function rmsnormBackwardRef(p: RmsNormRefInput, dy: ArrayLike<number>): { dx: Float64Array } {
  const { rows, d } = p;
  const { rstd } = rmsnormForwardRef(p);
  const dx = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) {
    const s = rstd[r] as number;
    let sum = 0;
    for (let i = 0; i < d; i++) sum += (dy[r * d + i] as number) * (p.w[i] as number) * (p.x[r * d + i] as number);
    for (let j = 0; j < d; j++) {
      const k = r * d + j;
      dx[k] = s * (p.w[j] as number) * (dy[k] as number) - ((s * s * s) / d) * (p.x[k] as number) * sum;
    }
  }
  return { dx };
}
