/**
 * In-browser kernel checks: the fused LoRA layer (forward and backward) and the frozen-weight
 * matmul against the float64 references, on awkward shapes. The same comparisons the test suite
 * makes, run on whatever GPU this browser has.
 */
import {
  createTensor,
  type GpuContext,
  planLoraBackward,
  planLoraForward,
  planMatmul,
  readFloat32,
  roundToF16,
  StepEncoder,
  tensorFromData,
} from '@webtune/core';
import { compare, loraBackwardRef, loraForwardRef, matmulRef, randomArray } from '@webtune/core/ref';

export interface CheckResult {
  name: string;
  maxAbs: number;
  ok: boolean;
}

async function checkMatmul(
  ctx: GpuContext,
  M: number,
  N: number,
  K: number,
  transW: boolean,
  f16: boolean,
): Promise<CheckResult> {
  const a = randomArray(M * K, 1);
  let w = randomArray(N * K, 2);
  if (f16) w = Float64Array.from(roundToF16(w));
  const ta = tensorFromData(ctx, a, [M, K], 'f32', 'a');
  const tw = tensorFromData(ctx, w, transW ? [N, K] : [K, N], f16 ? 'f16' : 'f32', 'w');
  const tc = createTensor(ctx, [M, N], 'f32', 'c');
  const d = await planMatmul(ctx, ta, tw, tc, { transW });
  new StepEncoder(ctx, 'check').dispatch(d).submit();
  const got = await readFloat32(tc);
  d.dispose();
  for (const t of [ta, tw, tc]) t.dispose();
  const c = compare('matmul', got, matmulRef(a, w, M, K, N, { transB: transW }), 2e-5 * Math.sqrt(K), 1e-5);
  return {
    name: `matmul ${M}×${N}×${K} ${transW ? 'x·Wᵀ' : 'dy·W'} ${f16 ? 'f16' : 'f32'} W`,
    maxAbs: c.maxAbs,
    ok: c.ok,
  };
}

async function checkLora(ctx: GpuContext, T: number, inF: number, outF: number, r: number): Promise<CheckResult[]> {
  const p = {
    T,
    inF,
    outF,
    r,
    x: randomArray(T * inF, 3),
    w0: Float64Array.from(roundToF16(randomArray(outF * inF, 4, 0.5))),
    a: randomArray(r * inF, 5, 0.5),
    b: randomArray(outF * r, 6, 0.5),
    scale: 2,
  };
  const dyData = randomArray(T * outF, 7);
  const layer = {
    w0: tensorFromData(ctx, p.w0, [outF, inF], 'f16', 'w0'),
    a: tensorFromData(ctx, p.a, [r, inF], 'f32', 'A'),
    b: tensorFromData(ctx, p.b, [outF, r], 'f32', 'B'),
    scale: p.scale,
  };
  const t = (shape: number[], label: string) => createTensor(ctx, shape, 'f32', label);
  const x = tensorFromData(ctx, p.x, [T, inF], 'f32', 'x');
  const dy = tensorFromData(ctx, dyData, [T, outF], 'f32', 'dy');
  const io = {
    x,
    dy,
    y: t([T, outF], 'y'),
    h: t([T, r], 'h'),
    g: t([T, r], 'g'),
    dx: t([T, inF], 'dx'),
    da: t([r, inF], 'dA'),
    db: t([outF, r], 'dB'),
  };
  const plan = [...(await planLoraForward(ctx, layer, io)), ...(await planLoraBackward(ctx, layer, io))];
  new StepEncoder(ctx, 'lora check').dispatch(...plan).submit();
  const ref = loraForwardRef(p);
  const grads = loraBackwardRef(p, dyData);
  const shape = `T=${T} in=${inF} out=${outF} r=${r}`;
  const results: CheckResult[] = [];
  for (const [name, tensor, want, k] of [
    ['y', io.y, ref.y, inF],
    ['dx', io.dx, grads.dx, outF],
    ['dA', io.da, grads.da, T * outF],
    ['dB', io.db, grads.db, T * inF],
  ] as const) {
    const c = compare(name, await readFloat32(tensor), want, 3e-5 * Math.sqrt(k) * 4, 1e-5);
    results.push({ name: `fused LoRA ${name}, ${shape}`, maxAbs: c.maxAbs, ok: c.ok });
  }
  for (const d of plan) d.dispose();
  for (const tensor of [layer.w0, layer.a, layer.b, ...Object.values(io)]) tensor.dispose();
  return results;
}

export async function runChecks(ctx: GpuContext, report: (r: CheckResult) => void): Promise<boolean> {
  let ok = true;
  const note = (r: CheckResult) => {
    ok &&= r.ok;
    report(r);
  };
  note(await checkMatmul(ctx, 65, 63, 257, true, false));
  note(await checkMatmul(ctx, 7, 257, 64, false, true));
  note(await checkMatmul(ctx, 64, 128, 256, true, true));
  for (const r of await checkLora(ctx, 65, 63, 257, 8)) note(r);
  for (const r of await checkLora(ctx, 7, 64, 65, 1)) note(r);
  return ok;
}
