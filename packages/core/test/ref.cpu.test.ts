// The float64 references are themselves checked: their backward against central finite
// differences of their forward, and the matmul reference against a hand-computed product.
import { describe, expect, it } from 'vitest';
import { compare, dot, finiteDifference, randomArray } from '../ref/check.js';
import { type LoraRefInput, loraBackwardRef, loraForwardRef } from '../ref/lora.js';
import { matmulRef } from '../ref/matmul.js';

describe('matmulRef', () => {
  it('multiplies a hand-worked example in every layout', () => {
    // A = [[1,2,3],[4,5,6]] (2×3), B = [[7,8],[9,10],[11,12]] (3×2) -> [[58,64],[139,154]]
    const a = [1, 2, 3, 4, 5, 6];
    const aT = [1, 4, 2, 5, 3, 6];
    const b = [7, 8, 9, 10, 11, 12];
    const bT = [7, 9, 11, 8, 10, 12];
    const want = [58, 64, 139, 154];
    expect([...matmulRef(a, b, 2, 3, 2)]).toEqual(want);
    expect([...matmulRef(aT, b, 2, 3, 2, { transA: true })]).toEqual(want);
    expect([...matmulRef(a, bT, 2, 3, 2, { transB: true })]).toEqual(want);
    expect([...matmulRef(aT, bT, 2, 3, 2, { transA: true, transB: true })]).toEqual(want);
  });
});

describe('loraBackwardRef', () => {
  const cases = [
    { T: 3, inF: 5, outF: 4, r: 2, bias: true },
    { T: 1, inF: 7, outF: 1, r: 1, bias: false },
    { T: 4, inF: 3, outF: 6, r: 3, bias: true },
    // LoRA dropout: a fixed mask on the branch's input.
    { T: 3, inF: 5, outF: 4, r: 2, bias: true, dropout: 0.4 },
  ];
  for (const c of cases) {
    it(`matches finite differences of the forward (T=${c.T} in=${c.inF} out=${c.outF} r=${c.r}${c.dropout ? ` dropout ${c.dropout}` : ''})`, () => {
      const p: LoraRefInput = {
        ...c,
        x: randomArray(c.T * c.inF, 1),
        w0: randomArray(c.outF * c.inF, 2),
        a: randomArray(c.r * c.inF, 3),
        b: randomArray(c.outF * c.r, 4),
        bias: c.bias ? randomArray(c.outF, 5) : undefined,
        scale: 1.75,
        dropout: c.dropout
          ? { p: c.dropout, keep: Array.from(randomArray(c.T * c.inF, 7), (v) => (v > -0.2 ? 1 : 0)) }
          : undefined,
      };
      // L = Σ y ∘ R for a fixed random R, so dL/dy = R.
      const R = randomArray(c.T * c.outF, 6);
      const loss = () => dot(loraForwardRef(p).y, R);
      const grads = loraBackwardRef(p, R);
      for (const [name, param, analytic] of [
        ['dx', p.x, grads.dx],
        ['dA', p.a, grads.da],
        ['dB', p.b, grads.db],
      ] as const) {
        const numeric = finiteDifference(loss, param as Float64Array);
        const cmp = compare(name, analytic, numeric, 1e-7, 1e-6);
        expect(cmp.ok, cmp.summary).toBe(true);
      }
      // W0 is frozen, but its gradient would be nonzero: the check would notice a missing term.
      const dW0 = finiteDifference(loss, p.w0 as Float64Array);
      expect(Math.max(...dW0.map(Math.abs))).toBeGreaterThan(0);
    });
  }

  it('gives B a gradient and A none when B is zero (PEFT’s initial state)', () => {
    const c = { T: 2, inF: 3, outF: 2, r: 2 };
    const p: LoraRefInput = {
      ...c,
      x: randomArray(6, 1),
      w0: randomArray(6, 2),
      a: randomArray(6, 3),
      b: new Float64Array(4),
      scale: 2,
    };
    const g = loraBackwardRef(p, randomArray(4, 4));
    expect(g.da.every((v) => v === 0)).toBe(true);
    expect(g.db.some((v) => v !== 0)).toBe(true);
  });
});
