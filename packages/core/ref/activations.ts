/**
 * Float64 references of the MLP nonlinearities, from their definitions:
 *   silu_mul:  out = silu(gate)·up,  silu(g) = g / (1 + e^−g)          (Llama, Qwen)
 *   gelu_new:  y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))           (GPT-2)
 * and their gradients.
 */

const sigmoid = (g: number) => 1 / (1 + Math.exp(-g));

export function siluMulForwardRef(gate: ArrayLike<number>, up: ArrayLike<number>): { out: Float64Array } {
  const out = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i] as number;
    out[i] = g * sigmoid(g) * (up[i] as number);
  }
  return { out };
}

/** d silu/dg = σ(g) + g·σ(g)·(1 − σ(g)). */
export function siluMulBackwardRef(
  gate: ArrayLike<number>,
  up: ArrayLike<number>,
  dout: ArrayLike<number>,
): { dgate: Float64Array; dup: Float64Array } {
  const dgate = new Float64Array(gate.length);
  const dup = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i] as number;
    const s = sigmoid(g);
    const d = dout[i] as number;
    dgate[i] = d * (up[i] as number) * (s + g * s * (1 - s));
    dup[i] = d * g * s;
  }
  return { dgate, dup };
}

const K = Math.sqrt(2 / Math.PI);
const C = 0.044715;

export function geluNewForwardRef(x: ArrayLike<number>): { y: Float64Array } {
  const y = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const a = x[i] as number;
    y[i] = 0.5 * a * (1 + Math.tanh(K * (a + C * a ** 3)));
  }
  return { y };
}

/** dy/dx = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh² u)·K·(1 + 3C·x²). */
export function geluNewBackwardRef(x: ArrayLike<number>, dy: ArrayLike<number>): { dx: Float64Array } {
  const dx = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const a = x[i] as number;
    const t = Math.tanh(K * (a + C * a ** 3));
    dx[i] = (dy[i] as number) * (0.5 * (1 + t) + 0.5 * a * (1 - t * t) * K * (1 + 3 * C * a * a));
  }
  return { dx };
}
