// The cross-entropy reference: values from transformers' ForCausalLMLoss (which shifts the labels
// itself and computes in f32), and the backward against central finite differences of the forward.
import { describe, expect, it } from 'vitest';
import { compare, finiteDifference, randomArray } from '../ref/check.js';
import {
  type CrossEntropyRefInput,
  crossEntropyBackwardRef,
  crossEntropyForwardRef,
  logitsRef,
} from '../ref/cross_entropy.js';

// B = 2, T = 4, V = 5, d = 3; the same formulas as the Python that produced the values below:
//   H[i][k] = ((i·5 + k·4 + i·k·3) % 11 − 5) / 8,  E[v][k] = ((v·7 + k·4 + v·k·5) % 13 − 6) / 9
//   labels (unshifted) = [[-100, 3, 1, 4], [2, 0, -100, 1]]
//   loss = ForCausalLMLoss(H·Eᵀ viewed [B, T, V], labels, V, num_items_in_batch=n); dH by autograd.
const B = 2;
const T = 4;
const V = 5;
const d = 3;
const h = Float64Array.from({ length: B * T * d }, (_, j) => {
  const i = Math.floor(j / d);
  const k = j % d;
  return (((i * 5 + k * 4 + i * k * 3) % 11) - 5) / 8;
});
const e = Float64Array.from({ length: V * d }, (_, j) => {
  const v = Math.floor(j / d);
  const k = j % d;
  return (((v * 7 + k * 4 + v * k * 5) % 13) - 6) / 9;
});
const unshifted = [
  [-100, 3, 1, 4],
  [2, 0, -100, 1],
];
// Row (b, t) predicts input t + 1; the last position of each sequence predicts nothing.
const labels = unshifted.flatMap((seq) => seq.map((_, t) => (t + 1 < T ? (seq[t + 1] as number) : -100)));

const golden = {
  mean: {
    loss: 1.6904096603393555,
    dh: [
      -0.109952226, 0.022641022, 0.030863782, -0.071626462, -0.025005853, -0.074978314, 0.054320097, 0.045607537,
      -0.04799344, 0, 0, 0, 0.096562617, -0.046634346, 0.017310534, 0, 0, 0, -0.063225865, -0.02121393, -0.072302096, 0,
      0, 0,
    ],
  },
  sum7: {
    loss: 1.2074354887008667,
    dh: [
      -0.078537308, 0.016172165, 0.022045555, -0.051161751, -0.017861325, -0.053555951, 0.038800068, 0.032576814,
      -0.034281027, 0, 0, 0, 0.068973303, -0.033310249, 0.012364665, 0, 0, 0, -0.045161329, -0.01515281, -0.051644351,
      0, 0, 0,
    ],
  },
};

describe('crossEntropyForwardRef / crossEntropyBackwardRef against transformers', () => {
  it('the shift gives these labels', () => {
    expect(labels).toEqual([3, 1, 4, -100, 0, -100, 1, -100]);
  });

  for (const [name, divisor] of [
    ['mean', undefined],
    ['sum7', 7],
  ] as const) {
    it(`${name === 'mean' ? 'mean over the counted rows' : 'sum / num_items_in_batch = 7'}`, () => {
      const p: CrossEntropyRefInput = { rows: B * T, d, vocab: V, h, e, labels, divisor };
      const f = crossEntropyForwardRef(p);
      // transformers computes in f32: agreement to f32 rounding.
      expect(Math.abs(f.loss - golden[name].loss)).toBeLessThan(1e-6);
      expect(f.count).toBe(5);
      const cmp = compare('dh', crossEntropyBackwardRef(p).dh, golden[name].dh, 2e-8, 1e-6);
      expect(cmp.ok, cmp.summary).toBe(true);
    });
  }
});

describe('crossEntropyForwardRef', () => {
  it('lse is log Σ exp of the logits, the row loss lse − z[label]', () => {
    const p: CrossEntropyRefInput = { rows: 1, d: 1, vocab: 3, h: [2], e: [1, 0, -1], labels: [0] };
    const f = crossEntropyForwardRef(p);
    const lse = Math.log(Math.exp(2) + 1 + Math.exp(-2));
    expect(f.lse[0]).toBeCloseTo(lse, 14);
    expect(f.loss).toBeCloseTo(lse - 2, 14);
    expect(logitsRef([2], [1, 0, -1], 1, 1, 3)).toEqual(Float64Array.from([2, 0, -2]));
  });

  it('is stable for large logits', () => {
    const p: CrossEntropyRefInput = { rows: 1, d: 1, vocab: 2, h: [1000], e: [1, 0.999], labels: [1] };
    expect(crossEntropyForwardRef(p).loss).toBeCloseTo(1 + Math.log1p(Math.exp(-1)), 10);
  });

  it('ignores -100, counts and skips other out-of-range labels, and gives 0 when nothing counts', () => {
    const base = { rows: 4, d: 2, vocab: 3, h: randomArray(8, 1), e: randomArray(6, 2) };
    const f = crossEntropyForwardRef({ ...base, labels: [-100, 3, -1, 2] });
    expect([f.count, f.badLabels]).toEqual([1, 2]);
    expect([...f.rowLoss].map((x) => x !== 0)).toEqual([false, false, false, true]);
    expect(f.loss).toBe(f.rowLoss[3]);
    const none = crossEntropyForwardRef({ ...base, labels: [-100, -100, -100, -100] });
    expect([none.loss, none.count]).toEqual([0, 0]);
    expect(crossEntropyBackwardRef({ ...base, labels: [-100, -100, -100, -100] }).dh.every((x) => x === 0)).toBe(true);
  });
});

describe('crossEntropyBackwardRef', () => {
  const cases = [
    { rows: 3, d: 4, vocab: 7, labels: [6, -100, 0], divisor: undefined, g: 1 },
    { rows: 5, d: 2, vocab: 1, labels: [0, 0, -100, 0, 0], divisor: undefined, g: 1 },
    { rows: 4, d: 3, vocab: 9, labels: [1, 8, 8, -100], divisor: 11, g: 0.37 },
    { rows: 2, d: 5, vocab: 4, labels: [-100, 5], divisor: undefined, g: 2 },
  ];
  for (const c of cases) {
    it(`matches finite differences (rows=${c.rows} d=${c.d} V=${c.vocab} divisor=${c.divisor} g=${c.g})`, () => {
      const p: CrossEntropyRefInput = {
        rows: c.rows,
        d: c.d,
        vocab: c.vocab,
        h: randomArray(c.rows * c.d, c.rows + c.vocab, 2),
        e: randomArray(c.vocab * c.d, c.d * 7, 2),
        labels: c.labels,
        divisor: c.divisor,
      };
      const numeric = finiteDifference(() => c.g * crossEntropyForwardRef(p).loss, p.h as Float64Array);
      const cmp = compare('dh', crossEntropyBackwardRef(p, c.g).dh, numeric, 1e-8, 1e-6);
      expect(cmp.ok, cmp.summary).toBe(true);
      // The check above could pass with an all-zero gradient only if the loss were flat; it is not.
      if (c.labels.some((l) => l >= 0 && l < c.vocab) && c.vocab > 1) {
        expect(Math.max(...numeric.map(Math.abs))).toBeGreaterThan(1e-3);
      }
    });
  }
});
