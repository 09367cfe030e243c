// AdamW with fused gradient clipping (shaders/adamw.wgsl after shaders/reduce.wgsl's norm), on
// arenas laid out like the trainer's (several tensors at aligned offsets, zero padding between
// them): ten steps of each golden case (golden/optim.json, torch.optim.AdamW in float32) with the
// per-step uniform rewritten between submits; the same against the float64 reference; non-finite
// gradients leave parameters and moments bit-for-bit untouched.
import { describe, expect, it } from 'vitest';
import { type AdamWRefHyper, adamwGoldenInputs, adamwStepRef } from '../ref/adamw.js';
import {
  createTensor,
  type GpuContext,
  readFloat32,
  readTensor,
  ShapeError,
  StepEncoder,
  type Tensor,
  TensorArena,
  tensorFromData,
  writeTensor,
} from '../src/index.js';
import { type AdamWHyperparameters, adamwStepUniforms, planAdamW } from '../src/kernels/adamw.js';
import {
  type LossScaleConfig,
  LossScaleConfigError,
  lossScaleInitialState,
  planLossScaleUpdate,
  resolveLossScale,
} from '../src/kernels/loss_scale.js';
import { planL2Norm, REDUCE_OUT_SIZE, reducePartialsSize } from '../src/kernels/reduce.js';
import type { GoldenAdamWCase } from './adamw.cpu.test.js';
import golden from './golden/optim.json';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();
const cases = golden.adamw as unknown as GoldenAdamWCase[];

/** The four arenas of one optimizer (identical layout), the norm scratch and result, the plan. */
async function makeOptimizer(
  ctx: GpuContext,
  sizes: readonly number[],
  h: AdamWHyperparameters,
  guard?: { losses: Tensor; latch: Tensor; count: number },
  lossScale?: { state: Tensor; config: LossScaleConfig },
) {
  const entries = (what: string) => sizes.map((n, i) => ({ shape: [n], label: `${what}${i}` }));
  const param = new TensorArena(ctx, entries('p'), 'params');
  const grad = new TensorArena(ctx, entries('g'), 'grads');
  const m = new TensorArena(ctx, entries('m'), 'exp_avg');
  const v = new TensorArena(ctx, entries('v'), 'exp_avg_sq');
  const partials = createTensor(ctx, [reducePartialsSize(ctx, grad.size)], 'f32', 'norm.partials');
  const norm = createTensor(ctx, [REDUCE_OUT_SIZE], 'f32', 'grad_norm');
  const normPlan = await planL2Norm(ctx, { x: grad.tensor, partials, out: norm });
  const adamw = await planAdamW(ctx, { norm, grad: grad.tensor, param: param.tensor, m: m.tensor, v: v.tensor }, h, {
    guard,
    lossScale,
  });
  // The scale's update after AdamW, as the trainer records it.
  const scaleUpdate =
    lossScale && guard
      ? [await planLossScaleUpdate(ctx, { norm, latch: guard.latch, state: lossScale.state }, lossScale.config)]
      : [];
  /** Writes a flat host array (tensors concatenated) into an arena's views. */
  const upload = (arena: TensorArena, flat: ArrayLike<number>) => {
    let o = 0;
    for (const view of arena.views) {
      writeTensor(
        view,
        Float32Array.from({ length: view.size }, (_, i) => flat[o + i] as number),
      );
      o += view.size;
    }
  };
  /** Reads an arena back: the views concatenated, and everything outside them (the padding). */
  const download = async (arena: TensorArena) => {
    const all = await readFloat32(arena.tensor);
    const flat: number[] = [];
    const inView = new Uint8Array(all.length);
    arena.views.forEach((view, i) => {
      const start = (arena.offsets[i] as number) / 4;
      flat.push(...all.subarray(start, start + view.size));
      inView.fill(1, start, start + view.size);
    });
    return { flat: Float32Array.from(flat), padding: all.filter((_, i) => !inView[i]) };
  };
  /** One training step's optimizer work, as the trainer records it: norm, AdamW, then the
   * gradient arena cleared for the next step's accumulation. */
  const step = (h: AdamWHyperparameters, t: number) => {
    adamw.setUniforms(adamwStepUniforms(h, t));
    const enc = new StepEncoder(ctx, `optimizer step ${t}`);
    enc.dispatch(...normPlan, adamw, ...scaleUpdate);
    enc.clear(grad.tensor);
    enc.submit();
  };
  const dispose = () => {
    for (const d of [...normPlan, adamw, ...scaleUpdate]) d.dispose();
    for (const a of [param, grad, m, v]) a.dispose();
    partials.dispose();
    norm.dispose();
  };
  return { param, grad, m, v, norm, upload, download, step, dispose };
}

const hyper = (c: GoldenAdamWCase, t: number): AdamWRefHyper => ({
  lr: c.lr[t - 1] as number,
  beta1: c.beta1,
  beta2: c.beta2,
  eps: c.eps,
  weightDecay: c.weightDecay,
  maxNorm: c.maxNorm ?? undefined,
});

describe('adamw vs torch.optim.AdamW (float32)', () => {
  for (const c of cases) {
    it(`${c.name}: sizes ${c.sizes.join(', ')}, 10 steps`, async () => {
      const ctx = gpu();
      const inputs = adamwGoldenInputs(c);
      // The float64 reference alongside, from the same inputs.
      const n = inputs.param.length;
      const ref = { param: inputs.param.slice(), m: new Float64Array(n), v: new Float64Array(n) };
      const refSnaps: Record<string, { param: Float64Array; m: Float64Array; v: Float64Array }> = {};
      for (let t = 1; t <= c.steps; t++) {
        adamwStepRef(ref, inputs.grads[t - 1] as Float64Array, hyper(c, t), t);
        refSnaps[String(t)] = { param: ref.param.slice(), m: ref.m.slice(), v: ref.v.slice() };
      }
      const got = await gpuCase(ctx, c.name, async () => {
        const opt = await makeOptimizer(ctx, c.sizes, hyper(c, 1));
        opt.upload(opt.param, inputs.param);
        const norms: number[] = [];
        const snaps: Record<string, Record<string, { flat: Float32Array; padding: Float32Array }>> = {};
        for (let t = 1; t <= c.steps; t++) {
          opt.upload(opt.grad, inputs.grads[t - 1] as Float64Array);
          opt.step(hyper(c, t), t);
          const stats = await readFloat32(opt.norm);
          expect([stats[1], stats[2]], `step ${t} finite flag and count`).toEqual([1, 0]);
          norms.push(stats[0] as number);
          if (t === c.steps) expect((await readFloat32(opt.grad.tensor)).every((x) => x === 0)).toBe(true);
          if (c.f32.snapshots[String(t)]) {
            snaps[String(t)] = {
              param: await opt.download(opt.param),
              m: await opt.download(opt.m),
              v: await opt.download(opt.v),
            };
          }
        }
        opt.dispose();
        return { norms, snaps };
      });
      expectClose(ctx, `${c.name} norms`, got.norms, c.f32.norm, 0, 1e-6);
      for (const [step, snap] of Object.entries(got.snaps)) {
        const want = c.f32.snapshots[step] as Record<string, number[] | undefined>;
        const r = refSnaps[step] as Record<string, Float64Array>;
        for (const k of ['param', 'm', 'v'] as const) {
          const { flat, padding } = snap[k] as { flat: Float32Array; padding: Float32Array };
          expect(
            padding.every((x) => x === 0),
            `${k} padding stays zero`,
          ).toBe(true);
          // Same f32 operations as torch in the same order; WGSL's sqrt and division may be off
          // by an ulp or two, and m (a running difference of gradients) passes near zero, so the
          // absolute part of the bound is scaled to the array's magnitude.
          const scale = Math.max(...(r[k] as Float64Array).map(Math.abs));
          const torch = want[k];
          if (torch) {
            // The file holds each f32 as its shortest decimal: Float32Array restores the exact value.
            const exact = Float32Array.from(torch);
            expectClose(ctx, `${c.name} step ${step} ${k} vs torch f32`, flat, exact, 1e-6 * scale, 1e-5);
          }
          expectClose(
            ctx,
            `${c.name} step ${step} ${k} vs float64 ref`,
            flat,
            r[k] as Float64Array,
            2e-6 * scale,
            1e-5,
          );
        }
      }
    });
  }
});

describe('adamw with non-finite gradients', () => {
  const h: AdamWRefHyper = { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.1, maxNorm: 1 };
  const sizes = [7, 65];
  const poisons: [string, (g: Float64Array) => void, number][] = [
    ['a NaN', (g) => (g[40] = Number.NaN), 1],
    [
      '+Inf and -Inf',
      (g) => {
        g[0] = Number.POSITIVE_INFINITY;
        g[71] = Number.NEGATIVE_INFINITY;
      },
      2,
    ],
    ['an overflowing norm (finite values of 1e20)', (g) => g.fill(1e20, 10, 20), 0],
  ];
  it('leave param, m and v bit-for-bit untouched, then the next good step applies', async () => {
    const ctx = gpu();
    const { param, grads } = adamwGoldenInputs({ sizes, initSeed: 5, initScale: 1, gradSeed: 6, gradScales: [1, 1] });
    await gpuCase(ctx, 'non-finite', async () => {
      const opt = await makeOptimizer(ctx, sizes, h);
      opt.upload(opt.param, param);
      // One good step first so m and v are not zero.
      opt.upload(opt.grad, grads[0] as Float64Array);
      opt.step(h, 1);
      const before = {
        param: (await opt.download(opt.param)).flat,
        m: (await opt.download(opt.m)).flat,
        v: (await opt.download(opt.v)).flat,
      };
      for (const [what, poison, count] of poisons) {
        const g = (grads[1] as Float64Array).slice();
        poison(g);
        opt.upload(opt.grad, g);
        opt.step(h, 2);
        const stats = await readFloat32(opt.norm);
        expect([stats[1], stats[2]], `${what}: finite flag and count`).toEqual([0, count]);
        for (const [k, arena] of [
          ['param', opt.param],
          ['m', opt.m],
          ['v', opt.v],
        ] as const) {
          const after = (await opt.download(arena)).flat;
          expect(new Uint32Array(after.buffer), `${what}: ${k} unchanged`).toEqual(
            new Uint32Array((before[k] as Float32Array).buffer),
          );
        }
      }
      // Good gradients again: the step applies (as the reference's step 2 does).
      opt.upload(opt.grad, grads[1] as Float64Array);
      opt.step(h, 2);
      const ref = { param: param.slice(), m: new Float64Array(param.length), v: new Float64Array(param.length) };
      adamwStepRef(ref, grads[0] as Float64Array, h, 1);
      adamwStepRef(ref, grads[1] as Float64Array, h, 2);
      expectClose(ctx, 'step after the skipped ones', (await opt.download(opt.param)).flat, ref.param, 1e-6, 1e-5);
      opt.dispose();
    });
  });
});

describe('adamw_step_guarded (a pipelined trainer)', () => {
  const h: AdamWRefHyper = { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.1, maxNorm: 1 };
  const sizes = [7, 65];
  it('skips on a non-finite loss, latches so later steps skip too, and resumes once the latch is cleared', async () => {
    const ctx = gpu();
    const { param, grads } = adamwGoldenInputs({ sizes, initSeed: 5, initScale: 1, gradSeed: 6, gradScales: [1, 1] });
    await gpuCase(ctx, 'guarded', async () => {
      const losses = createTensor(ctx, [2, 2], 'f32', 'losses');
      const latch = createTensor(ctx, [1], 'u32', 'latch');
      const opt = await makeOptimizer(ctx, sizes, h, { losses, latch, count: 2 });
      const read = async () => ({
        param: (await opt.download(opt.param)).flat,
        m: (await opt.download(opt.m)).flat,
        v: (await opt.download(opt.v)).flat,
      });
      const bits = (x: Float32Array) => new Uint32Array(x.buffer);
      opt.upload(opt.param, param);
      writeTensor(losses, [2.5, 10, 3.5, 12]);
      opt.upload(opt.grad, grads[0] as Float64Array);
      opt.step(h, 1);
      const ref = { param: param.slice(), m: new Float64Array(param.length), v: new Float64Array(param.length) };
      adamwStepRef(ref, grads[0] as Float64Array, h, 1);
      expectClose(
        ctx,
        'a guarded step with finite losses',
        (await opt.download(opt.param)).flat,
        ref.param,
        1e-6,
        1e-5,
      );
      expect([...(await readTensor(latch))]).toEqual([0]);
      const before = await read();
      // The second micro-batch's loss is infinite (its gradients are finite): nothing changes.
      writeTensor(losses, [2.5, 10, Number.POSITIVE_INFINITY, 12]);
      opt.upload(opt.grad, grads[1] as Float64Array);
      opt.step(h, 2);
      expect([...(await readTensor(latch))]).toEqual([1]);
      // A step queued behind it with good losses and gradients skips as well.
      writeTensor(losses, [2.5, 10, 3.5, 12]);
      opt.upload(opt.grad, grads[1] as Float64Array);
      opt.step(h, 2);
      const after = await read();
      for (const k of ['param', 'm', 'v'] as const) expect(bits(after[k]), `${k} unchanged`).toEqual(bits(before[k]));
      // The host clears the latch: the next step applies (the reference's step 2).
      writeTensor(latch, [0]);
      opt.upload(opt.grad, grads[1] as Float64Array);
      opt.step(h, 2);
      adamwStepRef(ref, grads[1] as Float64Array, h, 2);
      expectClose(
        ctx,
        'the step after the latch is cleared',
        (await opt.download(opt.param)).flat,
        ref.param,
        1e-6,
        1e-5,
      );
      opt.dispose();
      losses.dispose();
      latch.dispose();
    });
  });
});

// Dynamic loss scaling (the f16 backward): gradients S times the true ones, AdamW unscales them
// (adamw_step_scaled), and loss_scale_update moves S after each step as GradScaler.update does.
describe('adamw_step_scaled and loss_scale_update', () => {
  const h: AdamWRefHyper = { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.1, maxNorm: 1 };
  const sizes = [7, 65];
  it('update as unscaled, skip an overflow without latching and halve S, grow S, latch at the floor', async () => {
    const ctx = gpu();
    const { param, grads } = adamwGoldenInputs({ sizes, initSeed: 8, initScale: 1, gradSeed: 9, gradScales: [1, 3] });
    await gpuCase(ctx, 'loss-scaled adamw', async () => {
      const config = { initScale: 2 ** 10, growthInterval: 2, minScale: 2 ** 8 };
      const made = ['plain', 'scaled'].map((k) => ({
        losses: createTensor(ctx, [2, 2], 'f32', `${k}.losses`),
        latch: createTensor(ctx, [1], 'u32', `${k}.latch`),
      }));
      const state = tensorFromData(ctx, lossScaleInitialState(config), [4], 'f32', 'loss_scale');
      const [pg, sg] = made as [(typeof made)[0], (typeof made)[0]];
      const plain = await makeOptimizer(ctx, sizes, h, { ...pg, count: 2 });
      const scaled = await makeOptimizer(ctx, sizes, h, { ...sg, count: 2 }, { state, config });
      for (const g of made) writeTensor(g.losses, [2.5, 10, 3.5, 12]);
      plain.upload(plain.param, param);
      scaled.upload(scaled.param, param);
      const bits = (x: Float32Array) => [...new Uint32Array(x.buffer)];
      const state0 = async () => [...(await readFloat32(state))];
      const both = async (t: number, g: Float64Array, s: number) => {
        plain.upload(plain.grad, g);
        scaled.upload(
          scaled.grad,
          g.map((v) => v * s),
        );
        plain.step(h, t);
        scaled.step(h, t);
        for (const k of ['param', 'm', 'v'] as const)
          expect(bits((await scaled.download(scaled[k])).flat), `step ${t}: ${k} as unscaled`).toEqual(
            bits((await plain.download(plain[k])).flat),
          );
      };
      // Steps at S = 2^10 change exactly what unscaled steps change; the second grows S (interval 2).
      await both(1, grads[0] as Float64Array, 2 ** 10);
      expect(await state0()).toEqual([2 ** 10, 1, 2 ** 10, 0]);
      await both(2, grads[1] as Float64Array, 2 ** 10);
      expect(await state0()).toEqual([2 ** 11, 0, 2 ** 10, 0]);
      // And against the float64 reference of the unscaled steps directly.
      const ref = { param: param.slice(), m: new Float64Array(param.length), v: new Float64Array(param.length) };
      adamwStepRef(ref, grads[0] as Float64Array, h, 1);
      adamwStepRef(ref, grads[1] as Float64Array, h, 2);
      expectClose(ctx, 'two scaled steps', (await scaled.download(scaled.param)).flat, ref.param, 1e-6, 1e-5);
      // An overflow: nothing changes, nothing latches, S halves and the count of overflows rises.
      const before = bits((await scaled.download(scaled.param)).flat);
      const bad = (grads[0] as Float64Array).map((v, i) => (i === 3 ? Number.POSITIVE_INFINITY : v));
      scaled.upload(scaled.grad, bad);
      scaled.step(h, 3);
      expect(bits((await scaled.download(scaled.param)).flat)).toEqual(before);
      expect([...(await readTensor(sg.latch))]).toEqual([0]);
      expect(await state0()).toEqual([2 ** 10, 0, 2 ** 11, 1]);
      // The step after it applies at the lower scale, as the unscaled step 3 does.
      await both(3, grads[0] as Float64Array, 2 ** 10);
      expect(await state0()).toEqual([2 ** 10, 1, 2 ** 10, 1]);
      // A non-finite loss is a divergence: it latches and S stays as it was.
      writeTensor(sg.losses, [2.5, 10, Number.NaN, 12]);
      scaled.upload(
        scaled.grad,
        (grads[1] as Float64Array).map((v) => v * 2 ** 10),
      );
      scaled.step(h, 4);
      expect([...(await readTensor(sg.latch))]).toEqual([1]);
      expect(await state0()).toEqual([2 ** 10, 1, 2 ** 10, 1]);
      expect(bits((await scaled.download(scaled.param)).flat)).toEqual(bits((await plain.download(plain.param)).flat));
      // Overflows walk S down to its floor (2^8); there a gradient that is not finite latches.
      writeTensor(sg.latch, [0]);
      writeTensor(sg.losses, [2.5, 10, 3.5, 12]);
      for (const [want, latches] of [
        [2 ** 9, 0],
        [2 ** 8, 0],
        [2 ** 8, 1],
      ] as const) {
        scaled.upload(scaled.grad, bad);
        scaled.step(h, 4);
        expect((await state0())[0]).toBe(want);
        expect([...(await readTensor(sg.latch))], `latch with S = ${want} after the step`).toEqual([latches]);
      }
      expect(bits((await scaled.download(scaled.param)).flat)).toEqual(bits((await plain.download(plain.param)).flat));
      plain.dispose();
      scaled.dispose();
      for (const g of made) for (const x of [g.losses, g.latch]) x.dispose();
      state.dispose();
    });
  });

  it('refuses a configuration that would not scale exactly, and a scale without the guard', async () => {
    expect(resolveLossScale()).toEqual({
      initScale: 65536,
      growthFactor: 2,
      backoffFactor: 0.5,
      growthInterval: 2000,
      minScale: 1,
      maxScale: 2 ** 24,
    });
    expect(() => resolveLossScale({ initScale: 1000 })).toThrow(LossScaleConfigError);
    expect(() => resolveLossScale({ initScale: 1000 })).toThrow(/initScale 1000 must be a power of two/);
    expect(() => resolveLossScale({ growthFactor: 0.5 })).toThrow(/growthFactor 0.5 must be > 1/);
    expect(() => resolveLossScale({ backoffFactor: 3 })).toThrow(/power of two/);
    expect(() => resolveLossScale({ growthInterval: 0 })).toThrow(/growthInterval 0/);
    expect(() => resolveLossScale({ initScale: 2, minScale: 4 })).toThrow(/initScale 2 must lie in \[minScale 4/);
    expect(() => lossScaleInitialState({}, 3)).toThrow(/3 is not a power of two/);
    const ctx = gpu();
    await gpuCase(ctx, 'loss scale refusals', async () => {
      const t = (n: number, label: string) => createTensor(ctx, [n], 'f32', label);
      const [norm, g, p, m, v, state, short] = [
        t(REDUCE_OUT_SIZE, 'norm'),
        t(8, 'g'),
        t(8, 'p'),
        t(8, 'm'),
        t(8, 'v'),
        t(4, 'state'),
        t(3, 'short'),
      ] as Tensor[] as [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor];
      const latch = createTensor(ctx, [1], 'u32', 'latch');
      const b = { norm, grad: g, param: p, m, v };
      await expect(planAdamW(ctx, b, { lr: 1e-3 }, { lossScale: { state } })).rejects.toThrow(/needs the guard/);
      const guard = { losses: t(2, 'losses'), count: 1, latch };
      await expect(planAdamW(ctx, b, { lr: 1e-3 }, { guard, lossScale: { state: short } })).rejects.toThrow(
        /loss scale state short f32\[3\] must be 4 f32/,
      );
      await expect(planLossScaleUpdate(ctx, { norm, latch: norm, state })).rejects.toThrow(
        /latch norm must be one u32/,
      );
      for (const x of [norm, g, p, m, v, state, short, latch, guard.losses]) x.dispose();
    });
  });
});

describe('adamw shapes', () => {
  it('names the operands whose sizes, dtypes or buffers do not fit', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'adamw shape errors', async () => {
      const t = (n: number, label: string, dtype: 'f32' | 'i32' = 'f32') => createTensor(ctx, [n], dtype, label);
      const made: Tensor[] = [];
      const keep = (x: Tensor) => {
        made.push(x);
        return x;
      };
      const norm = keep(t(REDUCE_OUT_SIZE, 'norm'));
      const [g, p, m, v] = ['g', 'p', 'm', 'v'].map((l) => keep(t(100, l))) as [Tensor, Tensor, Tensor, Tensor];
      const short = keep(t(99, 'v_short'));
      const h = { lr: 1e-3 };
      await expect(planAdamW(ctx, { norm, grad: g, param: p, m, v: short }, h)).rejects.toThrow(ShapeError);
      await expect(planAdamW(ctx, { norm, grad: g, param: p, m, v: short }, h)).rejects.toThrow(
        /v v_short \[99\] has 99 elements, param p \[100\] has 100/,
      );
      await expect(planAdamW(ctx, { norm: g, grad: g, param: p, m, v }, h)).rejects.toThrow(
        /norm g \[100\] must have 3 elements/,
      );
      await expect(planAdamW(ctx, { norm, grad: g, param: p, m: p, v }, h)).rejects.toThrow(/share a buffer/);
      const ids = keep(t(100, 'ids', 'i32'));
      await expect(planAdamW(ctx, { norm, grad: ids, param: p, m, v }, h)).rejects.toThrow(/grad ids is i32/);
      await expect(planAdamW(ctx, { norm, grad: g, param: p, m, v }, { lr: 1e-3, eps: 0 })).rejects.toThrow(/eps 0/);
      for (const x of made) x.dispose();
    });
  });
});
