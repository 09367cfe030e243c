// elementwise.wgsl: element-by-element arithmetic and copies on flat f32 arrays.
//
//   add_scaled: out[i] = a[i] + alpha · b[i]     (out may not alias a or b)
//     bindings: 0 p (Params), 1 a (n, read), 2 b (n, read), 3 out (n, written)
//   copy_rows: dst[(base + r)·dst_stride + dst_off + c] = src[r·src_stride + src_off + c]
//              for r < rows, c < cols, with base = positions[0] read on the GPU, so a planned
//              copy into a KV cache follows the generation position without re-planning.
//     bindings: 0 q (CopyParams), 1 src (read), 2 positions (i32, read), 3 dst (written)
//   interleave3: dst[r·3·cols + j·cols + c] = src_j[r·cols + c] for j < 3, r < rows, c < cols:
//              three [rows, cols] buffers side by side in one [rows, 3·cols] (the attention
//              backward's dq, dk, dv into GPT-2's c_attn layout), one dispatch for the three.
//     bindings: 0 q (CopyParams: rows, cols, row_stride), 1 src (src_0), 3 dst, 4 src_1, 5 src_2
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

struct CopyParams {
  rows: u32,
  cols: u32,
  src_stride: u32,
  src_off: u32,
  dst_stride: u32,
  dst_off: u32,
  row_stride: u32,   // invocations per row of the 2-D dispatch grid
  _pad: u32,
}

@group(0) @binding(0) var<uniform> q: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn copy_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * q.row_stride + gid.x;
  if (i >= q.rows * q.cols) { return; }
  let r = i / q.cols;
  let c = i % q.cols;
  let base = u32(max(positions[0], 0));
  dst[(base + r) * q.dst_stride + q.dst_off + c] = src[r * q.src_stride + q.src_off + c];
}

@group(0) @binding(4) var<storage, read> src1: array<f32>;
@group(0) @binding(5) var<storage, read> src2: array<f32>;

@compute @workgroup_size(WG)
fn interleave3(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * q.row_stride + gid.x;
  let width = 3u * q.cols;
  if (i >= q.rows * width) { return; }
  let j = (i % width) / q.cols;
  let e = (i / width) * q.cols + i % q.cols;
  var x: f32;
  if (j == 0u) {
    x = src[e];
  } else if (j == 1u) {
    x = src1[e];
  } else {
    x = src2[e];
  }
  dst[i] = x;
}
