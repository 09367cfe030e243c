// probe_subgroups.wgsl: how the adapter lays subgroups over a 1-D workgroup. Each invocation
// writes its subgroup_invocation_id and subgroup_size at its local_invocation_index; the context
// (packages/core/src/subgroups.ts) turns subgroup reductions on only when every subgroup is a run
// of consecutive indices (id = index % size) of one power-of-two size.

enable subgroups;

@group(0) @binding(0) var<storage, read_write> out: array<u32>;

override WG: u32 = 256;

@compute @workgroup_size(WG)
fn main(
  @builtin(local_invocation_index) tid: u32,
  @builtin(subgroup_invocation_id) id: u32,
  @builtin(subgroup_size) size: u32,
) {
  out[2u * tid] = id;
  out[2u * tid + 1u] = size;
}
