// The float64 AdamW + clip_grad_norm_ reference against PyTorch (golden/optim.json, from
// tools/golden_optim.py): inputs regenerated bit for bit, ten steps compared with torch's float64
// run to rounding and with its float32 run to f32 accuracy; the per-step learning rates against
// schedule.ts; non-finite gradients skip the step; the uniform packing and its validation.
import { describe, expect, it } from 'vitest';
import {
  type AdamWRefHyper,
  type AdamWRefState,
  adamwGoldenInputs,
  adamwStepRef,
  clipCoefRef,
  gradNormRef,
} from '../ref/adamw.js';
import { compare } from '../ref/check.js';
import { ADAMW_STEP_UNIFORM_BYTES, AdamWConfigError, adamwStepUniforms, resolveAdamW } from '../src/kernels/adamw.js';
import { type LrSchedule, learningRate } from '../src/schedule.js';
import golden from './golden/optim.json';

export interface GoldenAdamWCase {
  name: string;
  sizes: number[];
  schedule: LrSchedule;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  maxNorm: number | null;
  initSeed: number;
  initScale: number;
  gradSeed: number;
  gradScales: number[];
  steps: number;
  checksum: { initSum: number; gradSum: number; firstGrad: number };
  lr: number[];
  f32: {
    norm: number[];
    coef: number[];
    snapshots: Record<string, { param: number[]; m?: number[]; v?: number[] }>;
  };
  f64: { norm: number[]; coef: number[]; final: { param: number[]; m: number[]; v: number[] } };
}

const cases = golden.adamw as unknown as GoldenAdamWCase[];

const hyper = (c: GoldenAdamWCase, step: number): AdamWRefHyper => ({
  lr: c.lr[step - 1] as number,
  beta1: c.beta1,
  beta2: c.beta2,
  eps: c.eps,
  weightDecay: c.weightDecay,
  maxNorm: c.maxNorm ?? undefined,
});

const sum = (a: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] as number;
  return s;
};

/** Ten reference steps from the golden inputs; snapshots at the steps torch recorded. */
function runRef(c: GoldenAdamWCase) {
  const inputs = adamwGoldenInputs(c);
  const n = inputs.param.length;
  const state: AdamWRefState = { param: inputs.param.slice(), m: new Float64Array(n), v: new Float64Array(n) };
  const norms: number[] = [];
  const coefs: number[] = [];
  const snaps: Record<string, AdamWRefState> = {};
  for (let t = 1; t <= c.steps; t++) {
    const r = adamwStepRef(state, inputs.grads[t - 1] as Float64Array, hyper(c, t), t);
    expect(r.applied).toBe(true);
    norms.push(r.norm);
    coefs.push(r.coef);
    snaps[String(t)] = { param: state.param.slice(), m: state.m.slice(), v: state.v.slice() };
  }
  return { inputs, norms, coefs, snaps };
}

describe('adamw reference vs torch', () => {
  for (const c of cases) {
    describe(c.name, () => {
      it('regenerates the golden inputs bit for bit', () => {
        const { param, grads } = adamwGoldenInputs(c);
        expect(sum(param)).toBe(c.checksum.initSum);
        expect(grads.reduce((s, g) => s + sum(g), 0)).toBe(c.checksum.gradSum);
        expect(grads[0]?.[0]).toBe(c.checksum.firstGrad);
      });

      it("uses schedule.ts's learning rates", () => {
        const want = c.lr;
        const got = want.map((_, k) => learningRate(c.schedule, k));
        expect(got).toEqual(want);
      });

      it('equals torch float64 to rounding over 10 steps', () => {
        const { norms, coefs, snaps } = runRef(c);
        const norm = compare('norm', norms, c.f64.norm, 0, 1e-14);
        expect(norm.ok, norm.summary).toBe(true);
        if (c.maxNorm !== null) {
          const coef = compare('coef', coefs, c.f64.coef, 0, 1e-14);
          expect(coef.ok, coef.summary).toBe(true);
        }
        const last = snaps[String(c.steps)] as AdamWRefState;
        // Ten steps of a few dozen float64 operations each, in a different order than torch's.
        for (const k of ['param', 'm', 'v'] as const) {
          const want = c.f64.final[k];
          const scale = Math.max(...want.map(Math.abs));
          const r = compare(`${k} after step ${c.steps}`, last[k], want, 1e-14 * scale, 1e-12);
          expect(r.ok, r.summary).toBe(true);
        }
      });

      it('agrees with torch float32 to f32 accuracy', () => {
        const { snaps } = runRef(c);
        for (const [step, snap] of Object.entries(c.f32.snapshots)) {
          const ref = snaps[step] as AdamWRefState;
          for (const k of ['param', 'm', 'v'] as const) {
            const want = snap[k];
            if (!want) continue;
            // torch's f32 run rounds every operation; m and v pass through values near zero
            // (m is a difference of gradients), so the tolerance has an absolute part scaled to
            // the array's magnitude.
            const scale = Math.max(...ref[k].map(Math.abs));
            const r = compare(`${k} after step ${step}`, ref[k], want, 2e-6 * scale, 2e-6);
            expect(r.ok, r.summary).toBe(true);
          }
        }
        const norm = compare('f32 norms', c.f64.norm, c.f32.norm, 0, 1e-6);
        expect(norm.ok, norm.summary).toBe(true);
      });
    });
  }
});

describe('adamw reference semantics', () => {
  it('clips only above maxNorm, as min(maxNorm / (norm + 1e-6), 1)', () => {
    expect(clipCoefRef(10, 1)).toBe(1 / (10 + 1e-6));
    expect(clipCoefRef(0.5, 1)).toBe(1);
    expect(clipCoefRef(10, undefined)).toBe(1);
  });

  it('skips the whole step on NaN or Inf gradients, and on an overflowing norm', () => {
    for (const bad of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      const state = { param: Float64Array.from([1, 2, 3]), m: Float64Array.from([0.1, 0, 0]), v: new Float64Array(3) };
      const r = adamwStepRef(state, [0.5, bad, 1], { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.1 }, 1);
      expect(r.applied).toBe(false);
      expect([...state.param, ...state.m, ...state.v]).toEqual([1, 2, 3, 0.1, 0, 0, 0, 0, 0]);
    }
    expect(gradNormRef([1e200, 1e200]).finite).toBe(false);
    expect(gradNormRef([3, Number.NaN, 4])).toEqual({ norm: 5, finite: false, nonFinite: 1 });
  });
});

describe('adamw uniforms', () => {
  it('packs the per-step scalars computed in float64 and rounded to f32 once', () => {
    const h = { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-6, weightDecay: 0.1, maxNorm: 1 };
    const u = new Float32Array(adamwStepUniforms(h, 7));
    expect(u.byteLength).toBe(ADAMW_STEP_UNIFORM_BYTES);
    const want = [1 - 3e-4 * 0.1, 0.95, 1 - 0.9, 1 - 0.95, 3e-4 / (1 - 0.9 ** 7), Math.sqrt(1 - 0.95 ** 7), 1e-6, 1];
    expect([...u]).toEqual(want.map(Math.fround));
    // No clipping: max_norm 0.
    expect(new Float32Array(adamwStepUniforms({ lr: 1e-3 }, 1))[7]).toBe(0);
    expect(new Float32Array(adamwStepUniforms({ lr: 1e-3, maxNorm: Number.POSITIVE_INFINITY }, 1))[7]).toBe(0);
  });

  it("has torch.optim.AdamW's defaults", () => {
    expect(resolveAdamW({ lr: 1e-3 })).toEqual({
      lr: 1e-3,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: 0.01,
      maxNorm: undefined,
    });
  });

  it('refuses hyperparameters that cannot work, naming them', () => {
    const bad: [object, RegExp][] = [
      [{ lr: -1 }, /lr -1/],
      [{ lr: Number.NaN }, /lr NaN/],
      [{ lr: 1e-3, beta1: 1 }, /beta1 1 must be in \[0, 1\)/],
      [{ lr: 1e-3, beta2: -0.1 }, /beta2/],
      [{ lr: 1e-3, eps: 0 }, /eps 0 must be/],
      [{ lr: 1e-3, weightDecay: -0.01 }, /weightDecay/],
      [{ lr: 1e-3, maxNorm: 0 }, /maxNorm 0/],
    ];
    for (const [h, msg] of bad) {
      expect(() => adamwStepUniforms(h as { lr: number }, 1)).toThrow(AdamWConfigError);
      expect(() => adamwStepUniforms(h as { lr: number }, 1)).toThrow(msg);
    }
    expect(() => adamwStepUniforms({ lr: 1e-3 }, 0)).toThrow(/step 0 must be an integer ≥ 1/);
    expect(() => adamwStepUniforms({ lr: 1e-3 }, 1.5)).toThrow(AdamWConfigError);
  });
});
