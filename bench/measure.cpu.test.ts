// The benchmark's spread statistics (measure.ts) against values worked out by hand and an exact
// binomial sum in BigInt: the sign test's p decides whether a reported ratio is settled.
import { describe, expect, it } from 'vitest';
import { rankSumP, ratioSpread, signTestP } from './measure.js';

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

/** The rank-sum p by brute force: every way of splitting the pooled values into groups of a's and
 * b's sizes, counting those whose U lies at least as far from its mean. */
function bruteRankSumP(a: readonly number[], b: readonly number[]): number {
  const pooled = [...a, ...b];
  const u = (xs: readonly number[], ys: readonly number[]) => {
    let n = 0;
    for (const x of xs) for (const y of ys) n += x < y ? 1 : x === y ? 0.5 : 0;
    return n;
  };
  const mean = (a.length * b.length) / 2;
  const observed = Math.abs(u(a, b) - mean);
  let hits = 0;
  let all = 0;
  const pick = (start: number, chosen: number[]) => {
    if (chosen.length === a.length) {
      const xs = chosen.map((i) => pooled[i] as number);
      const ys = pooled.filter((_, i) => !chosen.includes(i));
      all++;
      if (Math.abs(u(xs, ys) - mean) >= observed - 1e-9) hits++;
      return;
    }
    for (let i = start; i < pooled.length; i++) pick(i + 1, [...chosen, i]);
  };
  pick(0, []);
  return hits / all;
}

describe('rankSumP', () => {
  it('gives the hand-worked values', () => {
    // Wholly apart: 2 of C(6, 3) = 20 arrangements are as extreme (one per side).
    expect(rankSumP([1, 2, 3], [4, 5, 6])).toBeCloseTo(2 / 20, 15);
    expect(rankSumP([4, 5, 6], [1, 2, 3])).toBeCloseTo(2 / 20, 15);
    expect(rankSumP([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])).toBeCloseTo(2 / 252, 15);
    // U = 5 (1 < 2, 3, 6; 4 < 6; 5 < 6) against a mean of 4.5: every whole U is as far.
    expect(rankSumP([1, 4, 5], [2, 3, 6])).toBe(1);
    expect(rankSumP([], [1])).toBe(1);
  });

  it('matches brute force on small samples', () => {
    const cases: [number[], number[]][] = [
      [
        [3.1, 2.2, 5.0, 4.4],
        [6.1, 5.5, 7.2, 2.9, 8.0],
      ],
      [
        [10, 11, 12, 13, 14, 15],
        [9, 16, 17, 18, 19, 20, 21],
      ],
    ];
    for (const [a, b] of cases) expect(rankSumP(a, b)).toBeCloseTo(bruteRankSumP(a, b), 12);
  });

  it('counts a tie a half and takes U at the whole value nearer the mean, so ties never make a p smaller', () => {
    // U = 0.5 (the tied 2s) against a mean of 4.5 is taken as U = 1: P(U ≤ 1 or U ≥ 8) = 4/20 (the
    // counts of U = 0..9 over the 20 arrangements of 3 and 3 are 1 1 2 3 3 3 3 2 1 1).
    expect(rankSumP([2, 3, 4], [1, 2, 1.5])).toBeCloseTo(4 / 20, 15);
    expect(rankSumP([2.1, 3, 4], [1, 2.5, 1.5])).toBeCloseTo(4 / 20, 15); // U = 1 without a tie
    expect(rankSumP([2.1, 3, 4], [1, 2, 1.5])).toBeCloseTo(2 / 20, 15); // U = 0
    expect(rankSumP([5, 5, 5], [5, 5, 5])).toBe(1);
  });

  it('goes over to the normal approximation past exactLimit, close to the exact count', () => {
    // 51 × 50 = 2,550 pairs, past the default 2,500: two overlapping runs, and the same two
    // counted exactly.
    const a = Array.from({ length: 51 }, (_, i) => i + 0.25);
    const b = Array.from({ length: 50 }, (_, i) => i + 6.5);
    const approx = rankSumP(a, b);
    const exact = rankSumP(a, b, Number.POSITIVE_INFINITY);
    expect(approx).not.toBe(exact);
    expect(approx).toBeGreaterThan(0.01);
    expect(approx).toBeLessThan(0.2);
    expect(Math.abs(approx - exact) / exact).toBeLessThan(0.05);
    // A tie at a half-way U rounds toward the mean on that branch too.
    expect(rankSumP([...a, 10], [...b, 10], 0)).toBeGreaterThanOrEqual(rankSumP([...a, 10], [...b, 10.01], 0));
  });
});
