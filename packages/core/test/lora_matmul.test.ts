// The fused LoRA layer (shaders/lora_matmul.wgsl + the low-rank term of shaders/matmul.wgsl),
// forward and backward, against the float64 reference; and the unfused baseline likewise.
import { describe, it } from 'vitest';
import { randomArray } from '../ref/check.js';
import { type LoraRefInput, loraBackwardRef, loraForwardRef } from '../ref/lora.js';
import {
  createTensor,
  type DType,
  type GpuContext,
  type LoraLayer,
  planLoraBackward,
  planLoraBackwardUnfused,
  planLoraForward,
  planLoraForwardUnfused,
  readFloat32,
  roundToF16,
  StepEncoder,
  tensorFromData,
} from '../src/index.js';
import { expectClose, gpuCase, useGpu } from './gpu.js';

const gpu = useGpu();

interface Case {
  T: number;
  inF: number;
  outF: number;
  r: number;
  w0: DType;
  bias: boolean;
  accumulate: boolean;
}

const TS = [1, 7, 65, 257];
const DIMS = [1, 63, 64, 65, 257];
const RANKS = [1, 8, 64];
const cases: Case[] = [];
TS.forEach((T, i) => {
  DIMS.forEach((inF, j) => {
    cases.push({
      T,
      inF,
      outF: DIMS[(i + 2 * j + 1) % DIMS.length] as number,
      r: RANKS[(i + j) % RANKS.length] as number,
      w0: (i + j) % 2 ? 'f16' : 'f32',
      bias: j % 2 === 1,
      accumulate: (i + j) % 3 === 0,
    });
  });
});
cases.push({ T: 33, inF: 96, outF: 80, r: 128, w0: 'f16', bias: false, accumulate: false });
cases.push({ T: 64, inF: 64, outF: 64, r: 16, w0: 'f32', bias: true, accumulate: true });

const name = (c: Case) =>
  `T=${c.T} in=${c.inF} out=${c.outF} r=${c.r} W0:${c.w0}${c.bias ? ' +bias' : ''}${c.accumulate ? ' accumulate' : ''}`;

function inputs(c: Case): {
  p: LoraRefInput;
  dy: Float64Array;
  prev: { dx: Float64Array; da: Float64Array; db: Float64Array };
} {
  const seed = c.T * 7919 + c.inF * 31 + c.outF * 7 + c.r;
  let w0 = randomArray(c.outF * c.inF, seed + 1, 0.5);
  if (c.w0 === 'f16') w0 = Float64Array.from(roundToF16(w0));
  const p: LoraRefInput = {
    T: c.T,
    inF: c.inF,
    outF: c.outF,
    r: c.r,
    x: randomArray(c.T * c.inF, seed),
    w0,
    a: randomArray(c.r * c.inF, seed + 2, 0.5),
    b: randomArray(c.outF * c.r, seed + 3, 0.5),
    bias: c.bias ? randomArray(c.outF, seed + 4) : undefined,
    scale: 16 / c.r,
  };
  const prev = {
    dx: randomArray(c.T * c.inF, seed + 6),
    da: randomArray(c.r * c.inF, seed + 7),
    db: randomArray(c.outF * c.r, seed + 8),
  };
  return { p, dy: randomArray(c.T * c.outF, seed + 5), prev };
}

function upload(ctx: GpuContext, c: Case, p: LoraRefInput) {
  const layer: LoraLayer = {
    w0: tensorFromData(ctx, p.w0, [c.outF, c.inF], c.w0, 'w0'),
    a: tensorFromData(ctx, p.a, [c.r, c.inF], 'f32', 'lora_A'),
    b: tensorFromData(ctx, p.b, [c.outF, c.r], 'f32', 'lora_B'),
    bias: p.bias ? tensorFromData(ctx, p.bias, [c.outF], 'f32', 'bias') : undefined,
    scale: p.scale,
  };
  const x = tensorFromData(ctx, p.x, [c.T, c.inF], 'f32', 'x');
  const dispose = () => {
    for (const t of [layer.w0, layer.a, layer.b, layer.bias, x]) t?.dispose();
  };
  return { layer, x, dispose };
}

// Error bound: K-long f32 dot products of O(1) values; the low-rank term adds an r-long one.
const tol = (c: Case, k: number) => 3e-5 * Math.sqrt(k) * Math.max(1, Math.sqrt(c.r) * (16 / c.r));

for (const fused of [true, false]) {
  describe(fused ? 'lora fused' : 'lora unfused baseline', () => {
    for (const c of cases) {
      if (!fused && c.accumulate) continue; // the baseline has no accumulate mode
      it(name(c), async () => {
        const ctx = gpu();
        const { p, dy, prev } = inputs(c);
        const ref = loraForwardRef(p);
        const grads = loraBackwardRef(p, dy);
        const got = await gpuCase(ctx, name(c), async () => {
          const { layer, x, dispose } = upload(ctx, c, p);
          const y = createTensor(ctx, [c.T, c.outF], 'f32', 'y');
          const h = createTensor(ctx, [c.T, c.r], 'f32', 'h');
          const g = createTensor(ctx, [c.T, c.r], 'f32', 'g');
          const tdy = tensorFromData(ctx, dy, [c.T, c.outF], 'f32', 'dy');
          const init = (data: Float64Array, shape: number[], label: string) =>
            c.accumulate ? tensorFromData(ctx, data, shape, 'f32', label) : createTensor(ctx, shape, 'f32', label);
          const dx = init(prev.dx, [c.T, c.inF], 'dx');
          const da = init(prev.da, [c.r, c.inF], 'dA');
          const db = init(prev.db, [c.outF, c.r], 'dB');
          const io = { x, h, dy: tdy, g, dx, da, db };
          let release: () => void;
          const enc = new StepEncoder(ctx, 'lora step');
          if (fused) {
            const fwd = await planLoraForward(ctx, layer, { x, y, h });
            const bwd = await planLoraBackward(ctx, layer, io, {
              accumulateDx: c.accumulate,
              accumulateGrads: c.accumulate,
            });
            enc.dispatch(...fwd, ...bwd);
            release = () => {
              for (const d of [...fwd, ...bwd]) d.dispose();
            };
          } else {
            const fwd = await planLoraForwardUnfused(ctx, layer, { x, y, h });
            const bwd = await planLoraBackwardUnfused(ctx, layer, io);
            enc.dispatch(...fwd.dispatches, ...bwd.dispatches);
            release = () => {
              fwd.dispose();
              bwd.dispose();
            };
          }
          enc.submit();
          const out = {
            y: await readFloat32(y),
            h: await readFloat32(h),
            dx: await readFloat32(dx),
            da: await readFloat32(da),
            db: await readFloat32(db),
          };
          release();
          for (const t of [y, h, g, tdy, dx, da, db]) t.dispose();
          dispose();
          return out;
        });
        const acc = (want: Float64Array, before: Float64Array) =>
          c.accumulate ? want.map((v, i) => v + (before[i] as number)) : want;
        expectClose(ctx, `${name(c)} h`, got.h, ref.h, tol(c, c.inF), 1e-5);
        expectClose(ctx, `${name(c)} y`, got.y, ref.y, tol(c, c.inF), 1e-5);
        expectClose(ctx, `${name(c)} dx`, got.dx, acc(grads.dx, prev.dx), tol(c, c.outF), 1e-5);
        expectClose(ctx, `${name(c)} dA`, got.da, acc(grads.da, prev.da), tol(c, c.T * c.outF), 1e-5);
        expectClose(ctx, `${name(c)} dB`, got.db, acc(grads.db, prev.db), tol(c, c.T * c.inF), 1e-5);
      });
    }
  });
}
