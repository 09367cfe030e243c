// matvec_reduce_subgroups.wgsl: matvec_reduce (read matvec_reduce.wgsl) with subgroup operations.
// The MV_K partial sums of a column group are added in registers within each subgroup (subgroupAdd,
// or a subgroupShuffleXor butterfly when MV_K is below the subgroup size); only when MV_K spans
// several subgroups do their totals meet in workgroup memory: two barriers, where the tree takes
// log2(MV_K) + 2. Like group_reduce_subgroups.wgsl it relies on subgroups being runs of consecutive
// local_invocation_index values (lid.y·MV_K + lid.x), which the context measures before turning
// it on (packages/core/src/subgroups.ts), and reads the subgroup size at run time. The module
// enables subgroups before this file (kernels/compose.ts).

// One slot per subgroup and row (subgroups have at least 4 invocations).
var<workgroup> mv_sum: array<vec4<f32>, MV_M * ((MV_K + 3u) / 4u) * MV_N>;

// C[m][n0..n0+3] for the rows m < MV_M this invocation stores, from every invocation's partial
// sums: all of them (MV_K = 1), or row t = lid.x for t < MV_M after the reduction, returned in
// element 0. Starts with a barrier, so a second product may reuse mv_sum right after the first.
fn matvec_reduce(acc: array<vec4<f32>, MV_M>, lid: vec3<u32>) -> array<vec4<f32>, MV_M> {
  if (MV_K == 1u) { return acc; }
  let t = lid.x;
  let sg = subgroupAdd(1u);
  var sums: array<vec4<f32>, MV_M>;
  for (var m = 0u; m < MV_M; m++) {
    var v = acc[m];
    if (MV_K >= sg) {
      v = subgroupAdd(v);
    } else {
      for (var s = MV_K / 2u; s > 0u; s >>= 1u) { v += subgroupShuffleXor(v, s); }
    }
    sums[m] = v;
  }
  let per = MV_K / min(MV_K, sg);   // subgroups per column group
  let slots = (MV_K + 3u) / 4u;
  let first = lid.y * slots;
  workgroupBarrier();
  if (per > 1u && t % sg == 0u) {
    for (var m = 0u; m < MV_M; m++) { mv_sum[m * slots * MV_N + first + t / sg] = sums[m]; }
  }
  workgroupBarrier();
  var out: array<vec4<f32>, MV_M>;
  if (t < MV_M) {
    // Row t, picked with constant indices so that sums stays in registers.
    for (var m = 0u; m < MV_M; m++) {
      if (m == t) {
        if (per > 1u) {
          var v = mv_sum[m * slots * MV_N + first];
          for (var i = 1u; i < per; i++) { v += mv_sum[m * slots * MV_N + first + i]; }
          out[0] = v;
        } else {
          out[0] = sums[m];
        }
      }
    }
  }
  return out;
}
