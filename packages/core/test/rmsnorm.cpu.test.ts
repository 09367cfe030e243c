// The RMSNorm reference: a value from transformers' LlamaRMSNorm, and its backward against
// central finite differences of its forward.
import { describe, expect, it } from 'vitest';
import { compare, dot, finiteDifference, randomArray } from '../ref/check.js';
import { type RmsNormRefInput, rmsnormBackwardRef, rmsnormForwardRef } from '../ref/rmsnorm.js';

describe('rmsnormForwardRef', () => {
  it('matches LlamaRMSNorm (transformers 5.18, which normalises in f32)', () => {
    const { y, rstd } = rmsnormForwardRef({ rows: 1, d: 4, x: [1, -2, 3, 0.5], w: [0.5, 1, -1.5, 2], eps: 1e-5 });
    const want = [0.2649060785770416, -1.0596243143081665, -2.384154796600342, 0.5298121571540833];
    const cmp = compare('y', y, want, 0, 1e-6);
    expect(cmp.ok, cmp.summary).toBe(true);
    expect(rstd[0]).toBeCloseTo(1 / Math.sqrt(3.5625 + 1e-5), 12);
  });
});

describe('rmsnormBackwardRef', () => {
  const cases = [
    { rows: 3, d: 5, eps: 1e-5 },
    { rows: 1, d: 1, eps: 1e-6 },
    { rows: 2, d: 8, eps: 0.1 },
  ];
  for (const c of cases) {
    it(`matches finite differences of the forward (rows=${c.rows} d=${c.d} eps=${c.eps})`, () => {
      const p: RmsNormRefInput = { ...c, x: randomArray(c.rows * c.d, 1), w: randomArray(c.d, 2) };
      const R = randomArray(c.rows * c.d, 3);
      const loss = () => dot(rmsnormForwardRef(p).y, R);
      const numeric = finiteDifference(loss, p.x as Float64Array);
      const cmp = compare('dx', rmsnormBackwardRef(p, R).dx, numeric, 1e-7, 1e-6);
      expect(cmp.ok, cmp.summary).toBe(true);
      // w is frozen, but its gradient would be nonzero: the check above would notice a missing term.
      const dw = finiteDifference(loss, p.w as Float64Array);
      expect(Math.max(...dw.map(Math.abs))).toBeGreaterThan(0);
    });
  }
});
