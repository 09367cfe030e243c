// LoRA initialisation: PEFT's distributions (golden init.json: PEFT 0.21 / torch statistics of one
// layer, in 1024, out 512, r 32), drawn by webtune's seeded generator: bounds, mean and std within
// statistical tolerances, determinism per seed and per module, independence of the streams.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { type LoraInit, validateLoraConfig } from '../src/lora/config.js';
import { initLoraModule, initLoraWeights, loraInitDistributions, sampleLoraInit } from '../src/lora/init.js';
import { resolveLoraTargets } from '../src/lora/targets.js';
import { Rng } from '../src/random.js';

const GOLDEN = fileURLToPath(new URL('./golden/peft-config/', import.meta.url));

interface Stats {
  count: number;
  min: number;
  max: number;
  mean: number;
  std: number;
}
interface InitGolden {
  in: number;
  out: number;
  r: number;
  modes: { init_lora_weights: LoraInit; A: Stats; B: Stats }[];
}
const golden: InitGolden = JSON.parse(readFileSync(`${GOLDEN}init.json`, 'utf8'));

function stats(x: Float32Array): Stats {
  let min = Number.POSITIVE_INFINITY;
  let max = Number.NEGATIVE_INFINITY;
  let sum = 0;
  for (const v of x) {
    min = Math.min(min, v);
    max = Math.max(max, v);
    sum += v;
  }
  const mean = sum / x.length;
  let sq = 0;
  for (const v of x) sq += (v - mean) ** 2;
  return { count: x.length, min, max, mean, std: Math.sqrt(sq / x.length) };
}

/** The std of a distribution, and the tolerances of a sample of n (5 standard errors). */
function expected(dist: ReturnType<typeof loraInitDistributions>['a']) {
  if (dist.kind === 'zeros') return { std: 0, bound: 0 };
  if (dist.kind === 'uniform') return { std: dist.bound / Math.sqrt(3), bound: dist.bound };
  return { std: dist.std, bound: Number.POSITIVE_INFINITY };
}

function checkSample(s: Stats, dist: ReturnType<typeof loraInitDistributions>['a']): void {
  const { std, bound } = expected(dist);
  if (dist.kind === 'zeros') {
    expect(s).toMatchObject({ min: 0, max: 0, mean: 0, std: 0 });
    return;
  }
  const n = s.count;
  // mean ~ N(0, std^2/n); the sample std's standard error is about std * sqrt(k / n) with
  // k = (kurtosis - 1) / 4: 0.2 for a uniform, 0.5 for a normal.
  const k = dist.kind === 'uniform' ? 0.2 : 0.5;
  expect(Math.abs(s.mean)).toBeLessThan((5 * std) / Math.sqrt(n));
  expect(Math.abs(s.std - std)).toBeLessThan(5 * std * Math.sqrt(k / n));
  if (dist.kind === 'uniform') {
    expect(s.min).toBeGreaterThanOrEqual(-bound);
    expect(s.max).toBeLessThanOrEqual(bound);
    // The extremes of n uniforms are within bound * 20/n of the ends (probability ~1 - 2e-9).
    expect(s.min).toBeLessThan(-bound * (1 - 20 / n));
    expect(s.max).toBeGreaterThan(bound * (1 - 20 / n));
  } else {
    // 32768 normals: the extremes lie between 3 and 5.5 standard deviations.
    expect(Math.max(-s.min, s.max)).toBeGreaterThan(3 * std);
    expect(Math.max(-s.min, s.max)).toBeLessThan(5.5 * std);
  }
}

describe('LoRA initialisation', () => {
  const module = { name: 'proj', r: golden.r, inFeatures: golden.in, outFeatures: golden.out };

  for (const mode of golden.modes) {
    it(`init_lora_weights=${JSON.stringify(mode.init_lora_weights)}: PEFT's distribution`, () => {
      const dist = loraInitDistributions(module, mode.init_lora_weights);
      // PEFT's own sample (torch) fits the distribution webtune uses ...
      checkSample(mode.A, dist.a);
      checkSample(mode.B, dist.b);
      // ... and so does webtune's, for several seeds.
      for (const seed of [0, 1, 12345, 2 ** 40 + 7]) {
        const w = initLoraModule(module, mode.init_lora_weights, seed);
        expect(w.a.length).toBe(module.r * module.inFeatures);
        expect(w.b.length).toBe(module.outFeatures * module.r);
        checkSample(stats(w.a), dist.a);
        checkSample(stats(w.b), dist.b);
      }
    });
  }

  it('uses the bounds and std PEFT and torch use', () => {
    expect(loraInitDistributions({ r: 8, inFeatures: 64 }, true)).toEqual({
      a: { kind: 'uniform', bound: 1 / 8 },
      b: { kind: 'zeros' },
    });
    expect(loraInitDistributions({ r: 8, inFeatures: 64 }, 'gaussian')).toEqual({
      a: { kind: 'normal', std: 1 / 8 },
      b: { kind: 'zeros' },
    });
    expect(loraInitDistributions({ r: 16, inFeatures: 64 }, false)).toEqual({
      a: { kind: 'uniform', bound: 1 / 8 },
      b: { kind: 'uniform', bound: 1 / 4 },
    });
    // kaiming_uniform_(a = sqrt(5)): gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5)).
    const fanIn = 48;
    expect(Math.sqrt(2 / 6) * Math.sqrt(3 / fanIn)).toBeCloseTo(1 / Math.sqrt(fanIn), 15);
  });

  it('is deterministic per seed and module, independent across modules and seeds', () => {
    const a1 = initLoraModule({ name: 'm.q_proj', r: 4, inFeatures: 33, outFeatures: 17 }, false, 99);
    const a2 = initLoraModule({ name: 'm.q_proj', r: 4, inFeatures: 33, outFeatures: 17 }, false, 99);
    expect(a2.a).toEqual(a1.a);
    expect(a2.b).toEqual(a1.b);
    const other = initLoraModule({ name: 'm.v_proj', r: 4, inFeatures: 33, outFeatures: 17 }, false, 99);
    const seed2 = initLoraModule({ name: 'm.q_proj', r: 4, inFeatures: 33, outFeatures: 17 }, false, 100);
    const differs = (x: Float32Array, y: Float32Array) => x.some((v, i) => v !== y[i]);
    expect(differs(a1.a, other.a)).toBe(true);
    expect(differs(a1.a, seed2.a)).toBe(true);
    expect(differs(a1.a, a1.b.subarray(0, a1.a.length))).toBe(true);
    // A and B of one module come from different streams: B does not repeat A's numbers.
    const u = sampleLoraInit({ kind: 'uniform', bound: 1 }, 8, 5, 'x/A');
    const v = sampleLoraInit({ kind: 'uniform', bound: 1 }, 8, 5, 'x/B');
    expect(differs(u, v)).toBe(true);
  });

  it("a module's values do not depend on which other modules are adapted", () => {
    const modules = [
      { name: 'model.layers.0.self_attn.q_proj', kind: 'linear' as const, inFeatures: 16, outFeatures: 16 },
      { name: 'model.layers.0.self_attn.v_proj', kind: 'linear' as const, inFeatures: 16, outFeatures: 8 },
    ];
    const both = initLoraWeights(
      resolveLoraTargets(validateLoraConfig({ target_modules: ['q_proj', 'v_proj'], r: 2 }), modules, 'llama'),
      7,
    );
    const one = initLoraWeights(
      resolveLoraTargets(validateLoraConfig({ target_modules: ['v_proj'], r: 2 }), modules, 'llama'),
      7,
    );
    expect([...both.keys()]).toEqual(modules.map((m) => m.name));
    expect(one.get(modules[1]!.name)!.a).toEqual(both.get(modules[1]!.name)!.a);
    expect(both.get(modules[0]!.name)!.b.every((v) => v === 0)).toBe(true);
  });

  it('the generator: a known sequence, 53-bit uniforms in [0, 1), saved and restored state', () => {
    // xoshiro128** from the state {1, 2, 3, 4}: the reference implementation's first outputs.
    const ref = Rng.fromState([1, 2, 3, 4]);
    expect([...Array(6)].map(() => ref.nextU32())).toEqual([11520, 0, 5927040, 70819200, 2031721883, 1637235492]);
    const rng = new Rng(42, 'stream');
    const first = [rng.nextU32(), rng.nextU32(), rng.nextU32()];
    const again = new Rng(42, 'stream');
    expect([again.nextU32(), again.nextU32(), again.nextU32()]).toEqual(first);
    for (const v of first) expect(Number.isInteger(v) && v >= 0 && v < 2 ** 32).toBe(true);
    const state = rng.state();
    const cont = [rng.uniform(), rng.uniform()];
    const restored = Rng.fromState(state);
    expect([restored.uniform(), restored.uniform()]).toEqual(cont);
    let min = 1;
    let max = 0;
    let odd = 0;
    const r2 = new Rng(3);
    for (let i = 0; i < 100000; i++) {
      const u = r2.uniform();
      min = Math.min(min, u);
      max = Math.max(max, u);
      // Bit 52 of the fraction: set half of the time when all 53 bits are random.
      if (Math.floor(u * 2 ** 53) % 2 === 1) odd++;
    }
    expect(min).toBeGreaterThanOrEqual(0);
    expect(max).toBeLessThan(1);
    expect(Math.abs(odd - 50000)).toBeLessThan(5 * Math.sqrt(25000));
    expect(() => new Rng(-1)).toThrow(RangeError);
    expect(() => new Rng(1.5)).toThrow(RangeError);
    expect(() => Rng.fromState([0, 0, 0, 0])).toThrow(RangeError);
  });
});
