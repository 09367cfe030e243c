// elementwise.wgsl: element-by-element arithmetic on flat f32 arrays.
//
//   add_scaled: out[i] = a[i] + alpha · b[i]     (out may not alias a or b)
//
// Bindings, group 0: 0 p (uniform), 1 a (n, read), 2 b (n, read), 3 out (n, written).
// Threads are laid out 2-D (x fastest) so n can exceed 65535 workgroups' worth of one dimension.

struct Params {
  n: u32,
  alpha: f32,
  row_stride: u32,   // invocations per row of the 2-D dispatch grid
  _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 256;

@compute @workgroup_size(WG)
fn add_scaled(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * p.row_stride + gid.x;
  if (i < p.n) { out[i] = a[i] + p.alpha * b[i]; }
}
