// Learning-rate schedules (src/schedule.ts) against transformers' LambdaLR schedules
// (golden/optim.json "schedules", from tools/golden_optim.py): the lr of optimizer step k.
import { describe, expect, it } from 'vitest';
import { ShapeError } from '../src/errors.js';
import { type LrSchedule, learningRate, lrLambda } from '../src/schedule.js';
import golden from './golden/optim.json';

interface GoldenSchedule extends LrSchedule {
  steps: number;
  lrs: number[];
}
const schedules = golden.schedules as unknown as GoldenSchedule[];

const name = (s: GoldenSchedule) =>
  `${s.kind} lr=${s.lr}${s.warmupSteps !== undefined ? ` warmup=${s.warmupSteps}` : ''}` +
  `${s.totalSteps !== undefined ? ` total=${s.totalSteps}` : ''}${s.numCycles !== undefined ? ` cycles=${s.numCycles}` : ''}`;

describe(`schedules vs transformers ${golden.transformers}`, () => {
  for (const s of schedules) {
    it(name(s), () => {
      const got = s.lrs.map((_, k) => learningRate(s, k));
      if (s.kind !== 'cosine') {
        // Same float64 operations in the same order: bit-exact.
        expect(got).toEqual(s.lrs);
        return;
      }
      // Math.cos (V8's fdlibm) and Python's math.cos (the C library) may differ in the last bit.
      got.forEach((v, k) => {
        const want = s.lrs[k] as number;
        expect(Math.abs(v - want), `step ${k}: ${v} vs ${want}`).toBeLessThanOrEqual(4 * Number.EPSILON * s.lr);
      });
    });
  }

  it('starts warmup at lr 0 on the first step and reaches the base lr at step warmupSteps', () => {
    const s: LrSchedule = { kind: 'linear', lr: 1e-3, warmupSteps: 4, totalSteps: 10 };
    expect(learningRate(s, 0)).toBe(0);
    expect(learningRate(s, 4)).toBe(1e-3);
    expect(learningRate(s, 10)).toBe(0);
    expect(learningRate(s, 12)).toBe(0);
    expect(lrLambda({ kind: 'cosine', lr: 1, warmupSteps: 0, totalSteps: 10 }, 5)).toBeCloseTo(0.5, 15);
  });

  it('refuses incomplete or impossible schedules, naming the field', () => {
    expect(() => learningRate({ kind: 'linear', lr: 1e-3 }, 0)).toThrow(/totalSteps undefined/);
    expect(() => learningRate({ kind: 'cosine', lr: 1e-3, totalSteps: 5, warmupSteps: 1.5 }, 0)).toThrow(
      /warmupSteps 1.5/,
    );
    expect(() => learningRate({ kind: 'constant', lr: -1 }, 0)).toThrow(ShapeError);
    expect(() => learningRate({ kind: 'constant', lr: 1 }, -1)).toThrow(/step -1/);
    expect(() => learningRate({ kind: 'step' as LrSchedule['kind'], lr: 1 }, 0)).toThrow(/unknown.*'step'/);
  });
});
