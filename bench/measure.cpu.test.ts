// The benchmark's spread statistics (measure.ts) against values worked out by hand and an exact
// binomial sum in BigInt: the sign test's p decides whether a reported ratio is settled.
import { describe, expect, it } from 'vitest';
import { ratioSpread, signTestP } from './measure.js';

/** Two-sided sign test with exact integer binomial coefficients. */
function exactSignP(k: number, n: number): number {
  if (n === 0) return 1;
  const tail = Math.min(k, n - k);
  let sum = 0n;
  let c = 1n; // C(n, i)
  for (let i = 0; i <= tail; i++) {
    sum += c;
    c = (c * BigInt(n - i)) / BigInt(i + 1);
  }
  // 2·sum / 2^n, in floating point only at the end.
  const p = Number((2n * sum * 10n ** 18n) / 2n ** BigInt(n)) / 1e18;
  return Math.min(1, p);
}

describe('signTestP', () => {
  it('gives the hand-worked values', () => {
    expect(signTestP(0, 0)).toBe(1);
    expect(signTestP(7, 7)).toBeCloseTo(2 / 128, 15); // all 7 rounds on one side
    expect(signTestP(0, 6)).toBeCloseTo(2 / 64, 15);
    expect(signTestP(2, 10)).toBeCloseTo((2 * (1 + 10 + 45)) / 1024, 15);
    expect(signTestP(8, 10)).toBeCloseTo((2 * (1 + 10 + 45)) / 1024, 15); // symmetric
    expect(signTestP(3, 6)).toBe(1); // an even split is capped at 1
  });

  it('matches the exact binomial sum up to 300 rounds', () => {
    for (const n of [1, 2, 5, 13, 40, 101, 300]) {
      for (const k of [0, 1, Math.floor(n / 3), Math.floor(n / 2), n]) {
        const got = signTestP(k, n);
        expect(Number.isFinite(got), `k=${k} n=${n}`).toBe(true);
        const want = exactSignP(k, n);
        expect(Math.abs(got - want), `k=${k} n=${n}: ${got} vs ${want}`).toBeLessThanOrEqual(1e-12 + 1e-9 * want);
      }
    }
  });
});

describe('ratioSpread', () => {
  it('takes quartiles of the finite ratios and leaves ties out of the sign test', () => {
    const s = ratioSpread([1, 2, 3, Number.NaN, 1]);
    // Finite and sorted: 1, 1, 2, 3 (linear interpolation between order statistics).
    expect(s.median).toBeCloseTo(1.5, 15);
    expect(s.q1).toBeCloseTo(1, 15);
    expect(s.q3).toBeCloseTo(2.25, 15);
    expect(s.rounds).toBe(5);
    expect(s.ties).toBe(2);
    expect(s.signP).toBeCloseTo(signTestP(2, 2), 15); // 2 and 3 above 1, none below
  });

  it('settles seven rounds all on one side at p = 1/64', () => {
    const s = ratioSpread([0.8, 0.85, 0.9, 0.82, 0.88, 0.86, 0.84]);
    expect(s.median).toBeCloseTo(0.85, 15);
    expect(s.signP).toBeCloseTo(1 / 64, 15);
    expect(ratioSpread([0.9, 1.1, 0.95, 1.05]).signP).toBe(1);
  });
});
