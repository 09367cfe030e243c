// RoPE on the CPU: ropeInvFreq against transformers (golden/rope.json, from tools/golden_rope.py),
// the float64 reference against HF's apply_rotary_pos_emb, and the reference backward against
// finite differences of its forward.
import { describe, expect, it } from 'vitest';
import { compare, dot, finiteDifference, randomArray } from '../ref/check.js';
import { type RopeRefInput, ropeBackwardRef, ropeForwardRef } from '../ref/rope.js';
import { type RopeConfig, RopeConfigError, ropeInvFreq } from '../src/kernels/rope.js';
import golden from './golden/rope.json';

interface GoldenConfig extends RopeConfig {
  name: string;
  invFreq: number[];
  attentionScaling: number;
}
const configs = golden.configs as GoldenConfig[];

/** Distance in units in the last place between two f32 values of the same sign. */
function ulps(a: number, b: number): number {
  const bits = new Int32Array(new Float32Array([a, b]).buffer);
  return Math.abs((bits[0] as number) - (bits[1] as number));
}

describe('ropeInvFreq', () => {
  // PyTorch evaluates base ** e with SLEEF's vectorised powf on x86 (error up to 1 ulp) and with
  // the C library's powf on short tails; ropeInvFreq rounds the exact power to f32. The two
  // differ by one ulp on a few values in a thousand (one in this file), which no f32 RoPE can
  // resolve. Everything after the power is reproduced operation by operation.
  let exact = 0;
  let total = 0;
  for (const c of configs) {
    it(`equals transformers ${golden.transformers} to the ulp: ${c.name}`, () => {
      const { invFreq, attentionScaling } = ropeInvFreq(c);
      expect(attentionScaling).toBe(c.attentionScaling);
      expect(invFreq.length).toBe(c.invFreq.length);
      const off = c.invFreq.map((want, i) => ulps(invFreq[i] as number, want));
      expect(Math.max(...off), `ulps: ${off.join(' ')}`).toBeLessThanOrEqual(1);
      exact += off.filter((u) => u === 0).length;
      total += off.length;
    });
  }

  it('is bit-exact for all but a few values', () => {
    expect(total).toBe(176);
    expect(exact / total).toBeGreaterThan(0.98);
  });

  it('names the supported rope types when given another', () => {
    const yarn = { headDim: 64, ropeTheta: 1e4, ropeScaling: { rope_type: 'yarn', factor: 4 } };
    expect(() => ropeInvFreq(yarn as unknown as RopeConfig)).toThrow(RopeConfigError);
    expect(() => ropeInvFreq(yarn as unknown as RopeConfig)).toThrow(/"yarn".*default, llama3/);
    expect(() => ropeInvFreq({ headDim: 7, ropeTheta: 1e4 })).toThrow(/even/);
  });
});

describe('ropeForwardRef', () => {
  for (const a of golden.applications) {
    const c = configs[a.config] as GoldenConfig;
    it(`matches HF apply_rotary_pos_emb (${c.name}, B=${a.B} T=${a.T} heads=${a.nHeads} pos0=${a.pos0})`, () => {
      const base = {
        rows: a.B * a.T,
        T: a.T,
        nHeads: a.nHeads,
        headDim: c.headDim,
        pos0: a.pos0,
        invFreq: c.invFreq,
        attentionScaling: c.attentionScaling,
      };
      for (const [x, want] of [
        [a.q, a.qRot],
        [a.k, a.kRot],
      ] as const) {
        // HF rotates in f32 (cos/sin rounded to f32, then an f32 multiply-add).
        const cmp = compare('rope', ropeForwardRef({ ...base, x }).y, want, 2e-6, 2e-6);
        expect(cmp.ok, cmp.summary).toBe(true);
      }
    });
  }
});

describe('ropeBackwardRef', () => {
  const cases: Omit<RopeRefInput, 'x' | 'invFreq'>[] = [
    { rows: 6, T: 3, nHeads: 2, headDim: 4, pos0: 5, attentionScaling: 1 },
    { rows: 2, T: 2, nHeads: 1, headDim: 6, pos0: 0, attentionScaling: 0.75, positions: [9, 2] },
  ];
  for (const c of cases) {
    it(`matches finite differences of the forward (rows=${c.rows} heads=${c.nHeads} hd=${c.headDim})`, () => {
      const width = c.nHeads * c.headDim;
      const p: RopeRefInput = {
        ...c,
        invFreq: ropeInvFreq({ headDim: c.headDim, ropeTheta: 100 }).invFreq,
        x: randomArray(c.rows * width, 1),
      };
      const R = randomArray(c.rows * width, 2);
      const loss = () => dot(ropeForwardRef(p).y, R);
      const numeric = finiteDifference(loss, p.x as Float64Array);
      const cmp = compare('dx', ropeBackwardRef(p, R).dx, numeric, 1e-7, 1e-6);
      expect(cmp.ok, cmp.summary).toBe(true);
    });
  }
});
