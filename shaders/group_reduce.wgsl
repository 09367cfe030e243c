// group_reduce.wgsl: sums and maxima over aligned runs of `width` invocations of a 1-D
// workgroup, through workgroup memory. Every adapter can run it. group_reduce_subgroups.wgsl
// defines the same functions with subgroup operations; the kernel's TypeScript puts one of the
// two before its own source, by ctx.features.subgroups (packages/core/src/kernels/group_reduce.ts).
//
// Contract with the kernel that includes it:
//   - the kernel declares `override WG: u32`, its workgroup size, a power of two;
//   - tid is local_invocation_index; the run of tid is tid - tid % width .. + width - 1;
//   - width is a power of two dividing WG, the same for the whole workgroup;
//   - every invocation of the workgroup calls, in the same order (there are barriers).
// Each function returns its run's result to every invocation of the run. Width 1 returns v
// itself, with no barrier and no workgroup memory touched (CPU adapters' one-row-per-invocation
// kernels rely on that: there a barrier costs about 10 µs per four invocations on SwiftShader).

var<workgroup> group_red: array<vec2<f32>, WG>;
// group_sum4x4's: a 4×4 block of partial sums per invocation (lora_matmul.wgsl's lora_rows). An
// entry point that never reaches it does not allocate it (WebGPU counts the workgroup variables
// each entry point statically uses). At WG = 256 it is the whole 16 KiB default limit.
var<workgroup> group_red16: array<array<vec4<f32>, 4>, WG>;

fn group_sum2(tid: u32, width: u32, v: vec2<f32>) -> vec2<f32> {
  if (width == 1u) { return v; }
  let lane = tid % width;
  group_red[tid] = v;
  workgroupBarrier();
  for (var s = width / 2u; s > 0u; s >>= 1u) {
    if (lane < s) { group_red[tid] += group_red[tid + s]; }
    workgroupBarrier();
  }
  let total = group_red[tid - lane];
  workgroupBarrier();
  return total;
}

fn group_sum(tid: u32, width: u32, v: f32) -> f32 {
  return group_sum2(tid, width, vec2<f32>(v, 0.0)).x;
}

fn group_max(tid: u32, width: u32, v: f32) -> f32 {
  if (width == 1u) { return v; }
  let lane = tid % width;
  group_red[tid].x = v;
  workgroupBarrier();
  for (var s = width / 2u; s > 0u; s >>= 1u) {
    if (lane < s) { group_red[tid].x = max(group_red[tid].x, group_red[tid + s].x); }
    workgroupBarrier();
  }
  let total = group_red[tid - lane].x;
  workgroupBarrier();
  return total;
}

// Sixteen sums at once: v[i] added up over the run for each i (componentwise). One tree over the
// whole block, so a round costs one barrier for all sixteen.
fn group_sum4x4(tid: u32, width: u32, v: array<vec4<f32>, 4>) -> array<vec4<f32>, 4> {
  if (width == 1u) { return v; }
  let lane = tid % width;
  group_red16[tid] = v;
  workgroupBarrier();
  for (var s = width / 2u; s > 0u; s >>= 1u) {
    if (lane < s) {
      for (var i = 0u; i < 4u; i++) { group_red16[tid][i] += group_red16[tid + s][i]; }
    }
    workgroupBarrier();
  }
  let total = group_red16[tid - lane];
  workgroupBarrier();
  return total;
}
