// The LayerNorm reference: a value from torch.nn.LayerNorm, and its backward against central
// finite differences of its forward.
import { describe, expect, it } from 'vitest';
import { compare, dot, finiteDifference, randomArray } from '../ref/check.js';
import { type LayerNormRefInput, layernormBackwardRef, layernormForwardRef } from '../ref/layernorm.js';

describe('layernormForwardRef', () => {
  it('matches torch.nn.LayerNorm in float64', () => {
    const { y, mean } = layernormForwardRef({
      rows: 1,
      d: 4,
      x: [1, -2, 3, 0.5],
      w: [0.5, 1, -1.5, 2],
      b: [0.1, 0.2, 0.3, 0.4],
      eps: 1e-5,
    });
    const want = [0.20527919499431854, -1.2739087299204597, -1.7003047048920525, 0.25962774000757527];
    const cmp = compare('y', y, want, 0, 1e-14);
    expect(cmp.ok, cmp.summary).toBe(true);
    expect(mean[0]).toBe(0.625);
  });
});

describe('layernormBackwardRef', () => {
  const cases = [
    { rows: 3, d: 5, bias: true },
    { rows: 1, d: 2, bias: false },
    { rows: 2, d: 9, bias: true },
  ];
  for (const c of cases) {
    it(`matches finite differences of the forward (rows=${c.rows} d=${c.d})`, () => {
      const p: LayerNormRefInput = {
        rows: c.rows,
        d: c.d,
        eps: 1e-5,
        x: randomArray(c.rows * c.d, 1),
        w: randomArray(c.d, 2),
        b: c.bias ? randomArray(c.d, 4) : undefined,
      };
      const R = randomArray(c.rows * c.d, 3);
      const loss = () => dot(layernormForwardRef(p).y, R);
      const numeric = finiteDifference(loss, p.x as Float64Array);
      const cmp = compare('dx', layernormBackwardRef(p, R).dx, numeric, 1e-7, 1e-6);
      expect(cmp.ok, cmp.summary).toBe(true);
      const dw = finiteDifference(loss, p.w as Float64Array);
      expect(Math.max(...dw.map(Math.abs))).toBeGreaterThan(0);
    });
  }

  it('gives dx summing to zero in every row (y does not change when a row of x is shifted)', () => {
    // L = Σ y∘R; shifting x by a constant leaves y unchanged, so Σ_j dx_j = 0 in every row.
    const p: LayerNormRefInput = { rows: 2, d: 6, eps: 1e-5, x: randomArray(12, 5), w: randomArray(6, 6) };
    const { dx } = layernormBackwardRef(p, randomArray(12, 7));
    for (let r = 0; r < 2; r++) {
      expect(Math.abs(dx.slice(r * 6, r * 6 + 6).reduce((a, b) => a + b, 0))).toBeLessThan(1e-12);
    }
  });
});
