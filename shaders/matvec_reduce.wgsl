// matvec_reduce.wgsl: the reduction of matmul.wgsl's matrix-vector kernels, through workgroup
// memory (every adapter). matvec_reduce_subgroups.wgsl is the same function with subgroup
// operations; matmul.ts puts one of the two before matmul.wgsl, by ctx.features.subgroups.
// MV_M, MV_K and MV_N are matmul.wgsl's. The workgroup is (MV_K, MV_N): lid.y picks a group of 4
// columns, lid.x its invocation along K.

var<workgroup> mv_sum: array<vec4<f32>, MV_M * MV_K * MV_N>;

// C[m][n0..n0+3] for the rows m < MV_M this invocation stores, from every invocation's partial
// sums: all of them (MV_K = 1), or row t = lid.x for t < MV_M after the reduction, returned in
// element 0. Starts with a barrier, so a second product may reuse mv_sum right after the first.
fn matvec_reduce(acc: array<vec4<f32>, MV_M>, lid: vec3<u32>) -> array<vec4<f32>, MV_M> {
  if (MV_K == 1u) { return acc; }
  let t = lid.x;
  let slot = lid.y * MV_K;
  workgroupBarrier();
  for (var m = 0u; m < MV_M; m++) { mv_sum[m * MV_K * MV_N + slot + t] = acc[m]; }
  workgroupBarrier();
  for (var s = MV_K / 2u; s > 0u; s >>= 1u) {
    if (t < s) {
      for (var m = 0u; m < MV_M; m++) {
        let i = m * MV_K * MV_N + slot + t;
        mv_sum[i] += mv_sum[i + s];
      }
    }
    workgroupBarrier();
  }
  var out: array<vec4<f32>, MV_M>;
  if (t < MV_M) { out[0] = mv_sum[t * MV_K * MV_N + slot]; }
  return out;
}
