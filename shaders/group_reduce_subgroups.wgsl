// group_reduce_subgroups.wgsl: the functions of group_reduce.wgsl (read its contract there) with
// subgroup operations. Within a subgroup a run is added up in registers (subgroupAdd, or a
// butterfly of subgroupShuffleXor when the run is shorter than the subgroup); only runs longer than
// a subgroup go through workgroup memory, one value per subgroup and two barriers, where the tree
// takes log2(width) + 2 barriers.
//
// It relies on subgroups being consecutive runs of local_invocation_index: subgroup_invocation_id
// = tid % subgroup size. WGSL does not promise that, so the context measures it on the adapter
// before it turns this file on (packages/core/src/subgroups.ts). The subgroup size is read at run
// time (subgroupAdd(1u)), since a driver may choose it per pipeline; WebGPU's sizes are powers of
// two from 4 to 128. The module enables subgroups before this file (kernels/compose.ts).

// One slot per subgroup of the workgroup (subgroups have at least 4 invocations).
var<workgroup> group_red: array<vec2<f32>, WG / 4u>;
var<workgroup> group_red16: array<array<vec4<f32>, 4>, WG / 4u>;

fn group_sum2(tid: u32, width: u32, v: vec2<f32>) -> vec2<f32> {
  if (width == 1u) { return v; }
  let sg = subgroupAdd(1u);
  var t = v;
  if (width >= sg) {
    t = subgroupAdd(v);
  } else {
    for (var s = width / 2u; s > 0u; s >>= 1u) { t += subgroupShuffleXor(t, s); }
  }
  if (width <= 4u) { return t; }   // within one subgroup on every adapter
  let per = width / min(width, sg); // subgroups per run
  if (per > 1u && tid % sg == 0u) { group_red[tid / sg] = t; }
  workgroupBarrier();
  if (per > 1u) {
    let first = (tid / width) * per;
    t = group_red[first];
    for (var i = 1u; i < per; i++) { t += group_red[first + i]; }
  }
  workgroupBarrier();
  return t;
}

fn group_sum(tid: u32, width: u32, v: f32) -> f32 {
  return group_sum2(tid, width, vec2<f32>(v, 0.0)).x;
}

fn group_max(tid: u32, width: u32, v: f32) -> f32 {
  if (width == 1u) { return v; }
  let sg = subgroupAdd(1u);
  var t = v;
  if (width >= sg) {
    t = subgroupMax(v);
  } else {
    for (var s = width / 2u; s > 0u; s >>= 1u) { t = max(t, subgroupShuffleXor(t, s)); }
  }
  if (width <= 4u) { return t; }
  let per = width / min(width, sg);
  if (per > 1u && tid % sg == 0u) { group_red[tid / sg].x = t; }
  workgroupBarrier();
  if (per > 1u) {
    let first = (tid / width) * per;
    t = group_red[first].x;
    for (var i = 1u; i < per; i++) { t = max(t, group_red[first + i].x); }
  }
  workgroupBarrier();
  return t;
}

fn group_sum4x4(tid: u32, width: u32, v: array<vec4<f32>, 4>) -> array<vec4<f32>, 4> {
  if (width == 1u) { return v; }
  let sg = subgroupAdd(1u);
  var t = v;
  if (width >= sg) {
    for (var i = 0u; i < 4u; i++) { t[i] = subgroupAdd(v[i]); }
  } else {
    for (var s = width / 2u; s > 0u; s >>= 1u) {
      for (var i = 0u; i < 4u; i++) { t[i] += subgroupShuffleXor(t[i], s); }
    }
  }
  if (width <= 4u) { return t; }
  let per = width / min(width, sg);
  if (per > 1u && tid % sg == 0u) { group_red16[tid / sg] = t; }
  workgroupBarrier();
  if (per > 1u) {
    let first = (tid / width) * per;
    t = group_red16[first];
    for (var j = 1u; j < per; j++) {
      for (var i = 0u; i < 4u; i++) { t[i] += group_red16[first + j][i]; }
    }
  }
  workgroupBarrier();
  return t;
}
