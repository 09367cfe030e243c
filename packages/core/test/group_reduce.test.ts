// The group reductions every reducing kernel includes (group_sum2, group_sum, group_max, and
// lora_rows's group_sum4x4: the workgroup-memory trees of shaders/group_reduce.wgsl and their subgroup twins) on their own,
// against a float64 reference, for every run width from 1 to the workgroup. Widths below the
// adapter's subgroup size take the subgroupShuffleXor butterfly, widths above it meet in workgroup
// memory; with a subgroup size of 4 (SwiftShader) only width 2 reaches the butterfly. NaN is not
// tested here: WGSL lets implementations assume there is none, so callers that must see one test
// bits (cross_entropy.wgsl's nonfinite, reduce.wgsl's is_finite).
import { describe } from 'vitest';
import { randomArray } from '../ref/check.js';
import { bindKernel, createTensor, getKernel, readFloat32, StepEncoder, tensorFromData } from '../src/index.js';
import { withGroupReduce } from '../src/kernels/group_reduce.js';
import { expectClose, gpuCase, tableCases, useReductionPaths } from './gpu.js';

// Which of the table's cases each test project runs: gpu.ts's tableCases.
const tableIt = tableCases();

const KERNEL = `
override WG: u32 = 64;
override WIDTH: u32 = 1;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn reduce_runs(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let i = wid.x * WG + tid;
  let v = x[i];
  let pair = group_sum2(tid, WIDTH, vec2<f32>(v, 1.0 - v));
  let m = group_max(tid, WIDTH, v);
  let s = group_sum(tid, WIDTH, 2.0 * v);
  out[i] = vec4<f32>(pair, m, s);
}

// group_sum4x4: invocation i's block holds x[i]·(4·row + column + 1); out gets 16 floats each.
@compute @workgroup_size(WG)
fn reduce_blocks(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let i = wid.x * WG + tid;
  var v = array<vec4<f32>, 4>();
  for (var r = 0u; r < 4u; r++) { v[r] = x[i] * (vec4<f32>(1.0, 2.0, 3.0, 4.0) + f32(4u * r)); }
  let t = group_sum4x4(tid, WIDTH, v);
  for (var r = 0u; r < 4u; r++) { out[4u * i + r] = t[r]; }
}
`;
const source = withGroupReduce('packages/core/test/group_reduce.test.ts (test kernel)', KERNEL);

/** What every invocation of each run of `width` consecutive invocations gets. */
function runsRef(x: ArrayLike<number>, width: number): Float64Array {
  const out = new Float64Array(4 * x.length);
  for (let r = 0; r < x.length; r += width) {
    let sum = 0;
    let max = -Infinity;
    for (let i = r; i < r + width; i++) {
      sum += x[i] as number;
      max = Math.max(max, x[i] as number);
    }
    for (let i = r; i < r + width; i++) out.set([sum, width - sum, max, 2 * sum], 4 * i);
  }
  return out;
}

/** group_sum4x4's: 16 floats per invocation, the run's Σx times 1..16. */
function blocksRef(x: ArrayLike<number>, width: number): Float64Array {
  const sums = runsRef(x, width);
  const out = new Float64Array(16 * x.length);
  for (let i = 0; i < x.length; i++) {
    for (let c = 0; c < 16; c++) out[16 * i + c] = (sums[4 * i] as number) * (c + 1);
  }
  return out;
}

async function reduceRuns(
  ctx: ReturnType<ReturnType<typeof useReductionPaths>[number]['gpu']>,
  x: Float32Array,
  wg: number,
  width: number,
  entryPoint: 'reduce_runs' | 'reduce_blocks',
): Promise<Float32Array> {
  const kernel = await getKernel(
    ctx,
    { ...source(ctx), entryPoint, bindings: ['none', 'read', 'write'] },
    { WG: wg, WIDTH: width },
  );
  const tx = tensorFromData(ctx, x, [x.length], 'f32', 'x');
  const tout = createTensor(ctx, [x.length, entryPoint === 'reduce_runs' ? 4 : 16], 'f32', 'out');
  const d = bindKernel(ctx, kernel, { label: `runs of ${width}`, resources: [tx, tout], workgroups: [x.length / wg] });
  new StepEncoder(ctx, 'group reduce').dispatch(d).submit();
  const got = await readFloat32(tout);
  d.dispose();
  tx.dispose();
  tout.dispose();
  return got;
}

for (const path of useReductionPaths()) {
  describe(`group reductions (${path.name})`, () => {
    for (const wg of [64, 256]) {
      for (let width = 1; width <= wg; width *= 2) {
        if (wg === 256 && width > 1 && width < 64) continue; // the small runs are covered at 64
        tableIt(`workgroup ${wg}, runs of ${width}`, async (t) => {
          const ctx = path.gpu(t);
          const x = Float32Array.from(randomArray(3 * wg, wg + width, 4));
          const got = await gpuCase(ctx, `runs of ${width}`, () => reduceRuns(ctx, x, wg, width, 'reduce_runs'));
          expectClose(ctx, `workgroup ${wg}, runs of ${width}`, got, runsRef(x, width), 2e-6 * width, 1e-6);
        });
        tableIt(`workgroup ${wg}, 4×4 blocks in runs of ${width}`, async (t) => {
          const ctx = path.gpu(t);
          const x = Float32Array.from(randomArray(3 * wg, 2 * wg + width, 4));
          const got = await gpuCase(ctx, `blocks in runs of ${width}`, () =>
            reduceRuns(ctx, x, wg, width, 'reduce_blocks'),
          );
          expectClose(ctx, `workgroup ${wg}, blocks in runs of ${width}`, got, blocksRef(x, width), 3e-5 * width, 1e-6);
        });
      }
    }
  });
}
