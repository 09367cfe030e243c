// The float64 attention reference checked on its own: the backward against central finite
// differences of the forward (small shapes, GQA, pos0 > 0, keys nobody sees), the lse and the
// output against a hand-worked example, grouped heads against duplicated heads, and decode rows
// against the same rows of a full prefill.
import { describe, expect, it } from 'vitest';
import {
  type AttentionRefInput,
  attentionBackwardRef,
  attentionForwardRef,
  attentionProbsRef,
  attentionVisiblePairs,
} from '../ref/attention.js';
import { compare, dot, finiteDifference, randomArray } from '../ref/check.js';

interface Shape {
  B: number;
  Tq: number;
  Tk: number;
  pos0: number;
  nH: number;
  nKV: number;
  hd: number;
}

function input(s: Shape, seed: number, scale = 1 / Math.sqrt(s.hd)): AttentionRefInput {
  return {
    ...s,
    scale,
    q: randomArray(s.B * s.Tq * s.nH * s.hd, seed, 1.5),
    k: randomArray(s.B * s.Tk * s.nKV * s.hd, seed + 1, 1.5),
    v: randomArray(s.B * s.Tk * s.nKV * s.hd, seed + 2),
  };
}

describe('attentionBackwardRef', () => {
  const shapes: (Shape & { scale?: number })[] = [
    { B: 1, Tq: 3, Tk: 3, pos0: 0, nH: 1, nKV: 1, hd: 4 },
    { B: 2, Tq: 2, Tk: 5, pos0: 3, nH: 4, nKV: 2, hd: 3 },
    { B: 1, Tq: 4, Tk: 4, pos0: 0, nH: 3, nKV: 1, hd: 2, scale: 0.9 },
    // Keys 4 and 5 are beyond every query's position: their gradients must be zero.
    { B: 1, Tq: 2, Tk: 6, pos0: 2, nH: 2, nKV: 1, hd: 3 },
    { B: 2, Tq: 1, Tk: 4, pos0: 3, nH: 2, nKV: 2, hd: 5 },
  ];
  shapes.forEach((s, n) => {
    it(`matches finite differences (B=${s.B} Tq=${s.Tq} Tk=${s.Tk} pos0=${s.pos0} nH=${s.nH} nKV=${s.nKV} hd=${s.hd})`, () => {
      const p = input(s, 100 + 10 * n, s.scale);
      // L = Σ o ∘ R for a fixed random R, so ∂L/∂o = R.
      const R = randomArray(p.q.length, 7 + n);
      const loss = () => dot(attentionForwardRef(p).o, R);
      const grads = attentionBackwardRef(p, R);
      for (const [name, param, analytic] of [
        ['dq', p.q, grads.dq],
        ['dk', p.k, grads.dk],
        ['dv', p.v, grads.dv],
      ] as const) {
        const numeric = finiteDifference(loss, param as Float64Array);
        const cmp = compare(name, analytic, numeric, 1e-7, 1e-6);
        expect(cmp.ok, cmp.summary).toBe(true);
        expect(Math.max(...numeric.map(Math.abs)), `${name} is not trivially zero`).toBeGreaterThan(1e-3);
      }
      if (s.Tk > s.pos0 + s.Tq) {
        const unseen = s.pos0 + s.Tq; // first key no query sees
        for (let b = 0; b < s.B; b++) {
          for (let j = unseen; j < s.Tk; j++) {
            const row = (b * s.Tk + j) * s.nKV * s.hd;
            const slice = grads.dk.slice(row, row + s.nKV * s.hd);
            expect([...slice].every((x) => x === 0)).toBe(true);
          }
        }
      }
    });
  });

  it('delta = rowsum(dout ∘ o) equals Σ_j P·dP', () => {
    const s = { B: 2, Tq: 3, Tk: 5, pos0: 2, nH: 4, nKV: 2, hd: 3 };
    const p = input(s, 5);
    const dout = randomArray(p.q.length, 6);
    const { delta } = attentionBackwardRef(p, dout);
    const { probs } = attentionProbsRef(p);
    const want = new Float64Array(delta.length);
    for (let b = 0; b < s.B; b++) {
      for (let h = 0; h < s.nH; h++) {
        const g = Math.floor(h / (s.nH / s.nKV));
        for (let i = 0; i < s.Tq; i++) {
          let sum = 0;
          for (let j = 0; j < s.Tk; j++) {
            let dp = 0;
            for (let d = 0; d < s.hd; d++) {
              dp +=
                (dout[((b * s.Tq + i) * s.nH + h) * s.hd + d] as number) *
                (p.v[((b * s.Tk + j) * s.nKV + g) * s.hd + d] as number);
            }
            sum += (probs[((b * s.nH + h) * s.Tq + i) * s.Tk + j] as number) * dp;
          }
          want[(b * s.nH + h) * s.Tq + i] = sum;
        }
      }
    }
    const cmp = compare('delta', delta, want, 1e-12, 1e-10);
    expect(cmp.ok, cmp.summary).toBe(true);
  });
});

describe('attentionForwardRef', () => {
  it('computes a hand-worked example (o and lse)', () => {
    // hd = 1, scale 1: row 0 sees key 0 only; row 1 sees scores [2·3, 2·4] = [6, 8].
    const p: AttentionRefInput = {
      B: 1,
      Tq: 2,
      Tk: 2,
      pos0: 0,
      nH: 1,
      nKV: 1,
      hd: 1,
      scale: 1,
      q: [1, 2],
      k: [3, 4],
      v: [5, 6],
    };
    const { o, lse } = attentionForwardRef(p);
    const z = Math.exp(6) + Math.exp(8);
    expect(o[0]).toBeCloseTo(5, 14);
    expect(lse[0]).toBeCloseTo(3, 14);
    expect(o[1]).toBeCloseTo((5 * Math.exp(6) + 6 * Math.exp(8)) / z, 12);
    expect(lse[1]).toBeCloseTo(Math.log(z), 12);
  });

  it('gives lse = log Σ exp(scores) over the visible keys, even with large scores', () => {
    const s = { B: 1, Tq: 4, Tk: 9, pos0: 5, nH: 2, nKV: 1, hd: 3 };
    const p = input(s, 11, 20); // scores up to ~100: a naive sum of exp would still fit f64
    const { lse } = attentionForwardRef(p);
    for (let h = 0; h < s.nH; h++) {
      for (let i = 0; i < s.Tq; i++) {
        let sum = 0;
        for (let j = 0; j <= s.pos0 + i; j++) {
          let dotqk = 0;
          for (let d = 0; d < s.hd; d++) {
            dotqk += (p.q[(i * s.nH + h) * s.hd + d] as number) * (p.k[j * s.hd + d] as number);
          }
          sum += Math.exp(p.scale * dotqk);
        }
        expect(lse[h * s.Tq + i]).toBeCloseTo(Math.log(sum), 10);
      }
    }
  });

  it('treats grouped heads as duplicated kv heads (outputs equal, dk/dv summed over the group)', () => {
    const s = { B: 2, Tq: 3, Tk: 4, pos0: 1, nH: 4, nKV: 2, hd: 3 };
    const p = input(s, 21);
    const dup = (x: ArrayLike<number>) => {
      const out = new Float64Array(s.B * s.Tk * s.nH * s.hd);
      for (let b = 0; b < s.B; b++)
        for (let j = 0; j < s.Tk; j++)
          for (let h = 0; h < s.nH; h++)
            for (let d = 0; d < s.hd; d++) {
              out[((b * s.Tk + j) * s.nH + h) * s.hd + d] = x[
                ((b * s.Tk + j) * s.nKV + Math.floor(h / 2)) * s.hd + d
              ] as number;
            }
      return out;
    };
    const full: AttentionRefInput = { ...p, nKV: s.nH, k: dup(p.k), v: dup(p.v) };
    const a = attentionForwardRef(p);
    const b = attentionForwardRef(full);
    expect(compare('o', a.o, b.o, 1e-14, 0).ok).toBe(true);
    expect(compare('lse', a.lse, b.lse, 1e-14, 0).ok).toBe(true);
    const dout = randomArray(p.q.length, 22);
    const ga = attentionBackwardRef(p, dout);
    const gb = attentionBackwardRef(full, dout);
    const fold = (x: Float64Array) => {
      const out = new Float64Array(p.k.length);
      for (let b = 0; b < s.B; b++)
        for (let j = 0; j < s.Tk; j++)
          for (let h = 0; h < s.nH; h++)
            for (let d = 0; d < s.hd; d++) {
              const to = ((b * s.Tk + j) * s.nKV + Math.floor(h / 2)) * s.hd + d;
              out[to] = (out[to] as number) + (x[((b * s.Tk + j) * s.nH + h) * s.hd + d] as number);
            }
      return out;
    };
    expect(compare('dq', ga.dq, gb.dq, 1e-13, 0).ok).toBe(true);
    expect(compare('dk', ga.dk, fold(gb.dk), 1e-13, 0).ok).toBe(true);
    expect(compare('dv', ga.dv, fold(gb.dv), 1e-13, 0).ok).toBe(true);
  });

  it('decodes rows at pos0 > 0 exactly as the same rows of a full prefill', () => {
    const T = 7;
    const s = { B: 2, Tq: T, Tk: T, pos0: 0, nH: 3, nKV: 1, hd: 4 };
    const p = input(s, 31);
    const full = attentionForwardRef(p);
    const pos0 = 4;
    const rows = T - pos0;
    const q = new Float64Array(s.B * rows * s.nH * s.hd);
    for (let b = 0; b < s.B; b++) {
      const from = (b * T + pos0) * s.nH * s.hd;
      q.set((p.q as Float64Array).slice(from, from + rows * s.nH * s.hd), b * rows * s.nH * s.hd);
    }
    const dec = attentionForwardRef({ ...p, Tq: rows, pos0, q });
    for (let b = 0; b < s.B; b++) {
      for (let i = 0; i < rows; i++) {
        for (let c = 0; c < s.nH * s.hd; c++) {
          expect(dec.o[(b * rows + i) * s.nH * s.hd + c]).toBeCloseTo(
            full.o[(b * T + pos0 + i) * s.nH * s.hd + c] as number,
            13,
          );
        }
        for (let h = 0; h < s.nH; h++) {
          expect(dec.lse[(b * s.nH + h) * rows + i]).toBeCloseTo(full.lse[(b * s.nH + h) * T + pos0 + i] as number, 13);
        }
      }
    }
  });

  it('counts visible pairs', () => {
    expect(attentionVisiblePairs(3, 3, 0)).toBe(6);
    expect(attentionVisiblePairs(1, 9, 8)).toBe(9);
    expect(attentionVisiblePairs(2, 6, 2)).toBe(3 + 4);
  });
});
