/**
 * Float64 reference of the causal language-model loss, written from its definition with the full
 * logits materialised (fine for a reference):
 *
 *   z[i, v]  = H[i]·E[v]                    H [rows, d], E [V, d]
 *   lse[i]   = log Σ_v exp z[i, v]
 *   loss_i   = lse[i] − z[i, label_i]       for 0 ≤ label_i < V; rows labelled -100 (ignored) and
 *                                           rows with any other label outside [0, V) give 0
 *   count    = number of rows with 0 ≤ label_i < V
 *   loss     = Σ_i loss_i / divisor         divisor = count unless given; 0 when divisor is 0
 *
 *   dz[i, v] = g/divisor · (softmax(z[i])[v] − [v = label_i])   (0 for rows not counted)
 *   dH[i]    = Σ_v dz[i, v] · E[v]
 *
 * This is Hugging Face's ForCausalLMLoss once the labels are shifted (label of row (b, t) =
 * input_ids[b, t+1], -100 for the last position): reduction 'mean' when num_items_in_batch is not
 * given, 'sum' / num_items_in_batch when it is (our explicit divisor).
 */

export interface CrossEntropyRefInput {
  rows: number;
  d: number;
  vocab: number;
  /** [rows, d] */
  h: ArrayLike<number>;
  /** [vocab, d] */
  e: ArrayLike<number>;
  /** [rows]; -100 = ignored. */
  labels: ArrayLike<number>;
  /** Default: the number of counted rows. */
  divisor?: number;
}

const IGNORE_INDEX = -100;

/** z = H·Eᵀ, [rows, vocab]. */
export function logitsRef(
  h: ArrayLike<number>,
  e: ArrayLike<number>,
  rows: number,
  d: number,
  vocab: number,
): Float64Array {
  const z = new Float64Array(rows * vocab);
  for (let i = 0; i < rows; i++) {
    for (let v = 0; v < vocab; v++) {
      let s = 0;
      for (let k = 0; k < d; k++) s += (h[i * d + k] as number) * (e[v * d + k] as number);
      z[i * vocab + v] = s;
    }
  }
  return z;
}

function counted(label: number, vocab: number): boolean {
  return Number.isInteger(label) && label >= 0 && label < vocab;
}

export interface CrossEntropyForwardRef {
  loss: number;
  /** Σ_i loss_i before the division. */
  sum: number;
  count: number;
  divisor: number;
  /** [rows], for every row (ignored ones included). */
  lse: Float64Array;
  /** [rows], 0 where not counted. */
  rowLoss: Float64Array;
  /** Rows whose label is neither -100 nor in [0, V). */
  badLabels: number;
}

export function crossEntropyForwardRef(p: CrossEntropyRefInput): CrossEntropyForwardRef {
  const { rows, vocab } = p;
  const z = logitsRef(p.h, p.e, rows, p.d, vocab);
  const lse = new Float64Array(rows);
  const rowLoss = new Float64Array(rows);
  let sum = 0;
  let count = 0;
  let badLabels = 0;
  for (let i = 0; i < rows; i++) {
    const zi = z.subarray(i * vocab, (i + 1) * vocab);
    let m = -Infinity;
    for (const x of zi) m = Math.max(m, x);
    let s = 0;
    for (const x of zi) s += Math.exp(x - m);
    lse[i] = m + Math.log(s);
    const label = p.labels[i] as number;
    if (counted(label, vocab)) {
      rowLoss[i] = (lse[i] as number) - (zi[label] as number);
      sum += rowLoss[i] as number;
      count++;
    } else if (label !== IGNORE_INDEX) {
      badLabels++;
    }
  }
  const divisor = p.divisor ?? count;
  return { loss: divisor > 0 ? sum / divisor : 0, sum, count, divisor, lse, rowLoss, badLabels };
}

/** dH [rows, d] for loss scaled by g (the upstream gradient). */
export function crossEntropyBackwardRef(p: CrossEntropyRefInput, g = 1): { dh: Float64Array; dlogits: Float64Array } {
  const { rows, d, vocab } = p;
  const f = crossEntropyForwardRef(p);
  const z = logitsRef(p.h, p.e, rows, d, vocab);
  const coef = f.divisor > 0 ? g / f.divisor : 0;
  const dz = new Float64Array(rows * vocab);
  const dh = new Float64Array(rows * d);
  for (let i = 0; i < rows; i++) {
    const label = p.labels[i] as number;
    if (!counted(label, vocab)) continue;
    for (let v = 0; v < vocab; v++) {
      const prob = Math.exp((z[i * vocab + v] as number) - (f.lse[i] as number));
      dz[i * vocab + v] = coef * (prob - (v === label ? 1 : 0));
    }
    for (let v = 0; v < vocab; v++) {
      const w = dz[i * vocab + v] as number;
      for (let k = 0; k < d; k++) dh[i * d + k] = (dh[i * d + k] as number) + w * (p.e[v * d + k] as number);
    }
  }
  return { dh, dlogits: dz };
}
