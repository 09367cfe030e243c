// The activation references: values from transformers/torch, and backwards against central
// finite differences of the forwards.
import { describe, expect, it } from 'vitest';
import { geluNewBackwardRef, geluNewForwardRef, siluMulBackwardRef, siluMulForwardRef } from '../ref/activations.js';
import { compare, dot, finiteDifference, randomArray } from '../ref/check.js';

const X = [-3, -1, -0.5, 0, 0.5, 1, 3];

describe('activation references', () => {
  it('gelu_new matches transformers NewGELUActivation in float64', () => {
    const want = [
      -0.0036373920817729943, -0.1588080093917233, -0.15428599017485606, 0, 0.34571400982514394, 0.8411919906082768,
      2.996362607918227,
    ];
    const cmp = compare('gelu_new', geluNewForwardRef(X).y, want, 1e-16, 1e-14);
    expect(cmp.ok, cmp.summary).toBe(true);
  });

  it('silu_mul with up = 1 matches torch.nn.functional.silu in float64', () => {
    const want = [
      -0.14227761953270035, -0.2689414213699951, -0.1887703343990727, 0, 0.3112296656009273, 0.7310585786300049,
      2.8577223804672998,
    ];
    const cmp = compare(
      'silu',
      siluMulForwardRef(
        X,
        X.map(() => 1),
      ).out,
      want,
      1e-16,
      1e-14,
    );
    expect(cmp.ok, cmp.summary).toBe(true);
  });

  it('silu_mul backward matches finite differences', () => {
    const n = 40;
    const gate = randomArray(n, 1, 6);
    const up = randomArray(n, 2, 2);
    const R = randomArray(n, 3);
    const loss = () => dot(siluMulForwardRef(gate, up).out, R);
    const g = siluMulBackwardRef(gate, up, R);
    for (const [name, param, analytic] of [
      ['dgate', gate, g.dgate],
      ['dup', up, g.dup],
    ] as const) {
      const cmp = compare(name, analytic, finiteDifference(loss, param), 1e-7, 1e-6);
      expect(cmp.ok, cmp.summary).toBe(true);
    }
  });

  it('gelu_new backward matches finite differences', () => {
    const x = randomArray(40, 4, 6);
    const R = randomArray(40, 5);
    const loss = () => dot(geluNewForwardRef(x).y, R);
    const cmp = compare('dx', geluNewBackwardRef(x, R).dx, finiteDifference(loss, x), 1e-7, 1e-6);
    expect(cmp.ok, cmp.summary).toBe(true);
  });
});
