/**
 * Float64 reference of causal self-attention with grouped key/value heads, forward and
 * backward, written from the definition with plain loops (the scores are materialised; fine
 * for a reference).
 *
 *   q [B, Tq, nH, hd], k and v [B, Tk, nKV, hd], contiguous. Query head h reads kv head
 *   h / (nH / nKV). Query row i sits at absolute position pos0 + i; key j at position j.
 *   Key j is visible to query i iff j ≤ pos0 + i (and j < Tk).
 *
 *   S[b,h,i,j] = scale · q[b,i,h,:]·k[b,j,g,:]     (visible j only)
 *   P[b,h,i,:] = softmax_j S[b,h,i,:]
 *   o[b,i,h,:] = Σ_j P[b,h,i,j] · v[b,j,g,:]
 *   lse[b,h,i] = log Σ_j exp S[b,h,i,j]
 */

export interface AttentionRefInput {
  B: number;
  Tq: number;
  Tk: number;
  pos0: number;
  nH: number;
  nKV: number;
  hd: number;
  scale: number;
  /** [B, Tq, nH, hd] */
  q: ArrayLike<number>;
  /** [B, Tk, nKV, hd] */
  k: ArrayLike<number>;
  /** [B, Tk, nKV, hd] */
  v: ArrayLike<number>;
}

interface Indexer {
  q: (b: number, i: number, h: number) => number;
  kv: (b: number, j: number, g: number) => number;
  row: (b: number, h: number, i: number) => number;
  kvHead: (h: number) => number;
  visible: (i: number, j: number) => boolean;
}

function indexer(p: AttentionRefInput): Indexer {
  if (p.nH % p.nKV !== 0) throw new Error(`nH ${p.nH} is not a multiple of nKV ${p.nKV}`);
  const group = p.nH / p.nKV;
  return {
    q: (b, i, h) => ((b * p.Tq + i) * p.nH + h) * p.hd,
    kv: (b, j, g) => ((b * p.Tk + j) * p.nKV + g) * p.hd,
    row: (b, h, i) => (b * p.nH + h) * p.Tq + i,
    kvHead: (h) => Math.floor(h / group),
    visible: (i, j) => j < p.Tk && j <= p.pos0 + i,
  };
}

/** Softmax probabilities P [B, nH, Tq, Tk] (zero where masked) and lse [B, nH, Tq]. */
export function attentionProbsRef(p: AttentionRefInput): { probs: Float64Array; lse: Float64Array } {
  const ix = indexer(p);
  const probs = new Float64Array(p.B * p.nH * p.Tq * p.Tk);
  const lse = new Float64Array(p.B * p.nH * p.Tq);
  for (let b = 0; b < p.B; b++) {
    for (let h = 0; h < p.nH; h++) {
      const g = ix.kvHead(h);
      for (let i = 0; i < p.Tq; i++) {
        const rowP = ix.row(b, h, i) * p.Tk;
        let max = -Infinity;
        for (let j = 0; j < p.Tk; j++) {
          if (!ix.visible(i, j)) continue;
          let s = 0;
          const qo = ix.q(b, i, h);
          const ko = ix.kv(b, j, g);
          for (let d = 0; d < p.hd; d++) s += (p.q[qo + d] as number) * (p.k[ko + d] as number);
          s *= p.scale;
          probs[rowP + j] = s;
          if (s > max) max = s;
        }
        let sum = 0;
        for (let j = 0; j < p.Tk; j++) {
          if (!ix.visible(i, j)) continue;
          const e = Math.exp((probs[rowP + j] as number) - max);
          probs[rowP + j] = e;
          sum += e;
        }
        for (let j = 0; j < p.Tk; j++) probs[rowP + j] = ix.visible(i, j) ? (probs[rowP + j] as number) / sum : 0;
        lse[ix.row(b, h, i)] = max + Math.log(sum);
      }
    }
  }
  return { probs, lse };
}

/** o [B, Tq, nH, hd] and lse [B, nH, Tq]. */
export function attentionForwardRef(p: AttentionRefInput): { o: Float64Array; lse: Float64Array } {
  const ix = indexer(p);
  const { probs, lse } = attentionProbsRef(p);
  const o = new Float64Array(p.B * p.Tq * p.nH * p.hd);
  for (let b = 0; b < p.B; b++) {
    for (let h = 0; h < p.nH; h++) {
      const g = ix.kvHead(h);
      for (let i = 0; i < p.Tq; i++) {
        const oo = ix.q(b, i, h);
        const rowP = ix.row(b, h, i) * p.Tk;
        for (let j = 0; j < p.Tk; j++) {
          const pij = probs[rowP + j] as number;
          if (pij === 0) continue;
          const vo = ix.kv(b, j, g);
          for (let d = 0; d < p.hd; d++) o[oo + d] = (o[oo + d] as number) + pij * (p.v[vo + d] as number);
        }
      }
    }
  }
  return { o, lse };
}

/**
 * Gradients given dout = ∂L/∂o [B, Tq, nH, hd]. Derived by hand:
 *   dv[j]  = Σ_i P[i,j] · dout[i]                       (summed over the query heads of kv head g)
 *   dP[i,j] = dout[i]·v[j]
 *   dS[i,j] = P[i,j] · (dP[i,j] − Σ_j' P[i,j'] dP[i,j'])  (the softmax Jacobian)
 *   dq[i]  = scale · Σ_j dS[i,j] · k[j]
 *   dk[j]  = scale · Σ_i dS[i,j] · q[i]                  (summed over the group's query heads)
 * Also returns delta = rowsum(dout ∘ o) [B, nH, Tq], which equals Σ_j P dP (the kernels use it).
 */
export function attentionBackwardRef(
  p: AttentionRefInput,
  dout: ArrayLike<number>,
): { dq: Float64Array; dk: Float64Array; dv: Float64Array; delta: Float64Array } {
  const ix = indexer(p);
  const { probs } = attentionProbsRef(p);
  const { o } = attentionForwardRef(p);
  const dq = new Float64Array(p.q.length);
  const dk = new Float64Array(p.k.length);
  const dv = new Float64Array(p.v.length);
  const delta = new Float64Array(p.B * p.nH * p.Tq);
  const dP = new Float64Array(p.Tk);
  for (let b = 0; b < p.B; b++) {
    for (let h = 0; h < p.nH; h++) {
      const g = ix.kvHead(h);
      for (let i = 0; i < p.Tq; i++) {
        const qo = ix.q(b, i, h);
        const rowP = ix.row(b, h, i) * p.Tk;
        let dsum = 0;
        for (let d = 0; d < p.hd; d++) dsum += (dout[qo + d] as number) * (o[qo + d] as number);
        delta[ix.row(b, h, i)] = dsum;
        let pdp = 0;
        for (let j = 0; j < p.Tk; j++) {
          dP[j] = 0;
          if (!ix.visible(i, j)) continue;
          const vo = ix.kv(b, j, g);
          let s = 0;
          for (let d = 0; d < p.hd; d++) s += (dout[qo + d] as number) * (p.v[vo + d] as number);
          dP[j] = s;
          pdp += (probs[rowP + j] as number) * s;
        }
        for (let j = 0; j < p.Tk; j++) {
          if (!ix.visible(i, j)) continue;
          const pij = probs[rowP + j] as number;
          const ds = pij * ((dP[j] as number) - pdp);
          const ko = ix.kv(b, j, g);
          for (let d = 0; d < p.hd; d++) {
            dv[ko + d] = (dv[ko + d] as number) + pij * (dout[qo + d] as number);
            dq[qo + d] = (dq[qo + d] as number) + p.scale * ds * (p.k[ko + d] as number);
            dk[ko + d] = (dk[ko + d] as number) + p.scale * ds * (p.q[qo + d] as number);
          }
        }
      }
    }
  }
  return { dq, dk, dv, delta };
}

/** Number of (query, key) pairs that are visible, per batch and head. */
export function attentionVisiblePairs(Tq: number, Tk: number, pos0: number): number {
  let n = 0;
  for (let i = 0; i < Tq; i++) n += Math.max(0, Math.min(Tk, pos0 + i + 1));
  return n;
}
