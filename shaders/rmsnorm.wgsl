// rmsnorm.wgsl: RMS normalisation of rows of length d (Llama, Qwen; Qwen3's per-head q_norm/k_norm).
//
//   forward   rstd[r] = 1 / sqrt(mean_i(x[r,i]²) + eps)
//             y[r,i]  = w[i] · (x[r,i] · rstd[r])            (Hugging Face's order, all in f32)
//   backward  dx[r,i] = rstd·(w[i]·dy[r,i] − x[r,i] · rstd² · (Σ_j dy[r,j]·w[j]·x[r,j]) / d)
//
// The weight w is frozen: the backward produces dx only, never dw.
// The forward saves rstd (one f32 per row) for the backward, which also reads x again.
// y and rstd are written. dx is written, or accumulated (dx += ...) when p.accumulate != 0, since
// the residual stream's gradient adds up.
//
// Row layout. Row r (0 <= r < rows) is split as r = o·G + g (o: outer row, such as the token; g:
// the group, such as the head), and its d elements start at
//   x:  o·x_stride + x_offset + g·d        (dx uses the same layout as x)
//   y:  o·y_stride + y_offset + g·d        (dy uses the same layout as y)
// so one dispatch can normalise the q heads inside a fused qkv buffer (G = heads, stride = the
// fused width, offset = where q starts). Plain [rows, d] is G = 1, stride = d, offset 0.
//
// rmsnorm_fwd_copy also copies x into x_copy (same layout as x). A transformer layer's norms use it:
// the copy is where the projection after the block accumulates its output (C += ..., beta = 1), so
// the residual add costs no dispatch of its own and the norm's input stays intact for the backward.
//
// Bindings, group 0:
//   rmsnorm_fwd: 0 p uniform, 1 x (read), 2 w [d] (read), 3 rstd [rows] (written), 4 y (written)
//   rmsnorm_fwd_copy: the same and 5 x_copy (written)
//   rmsnorm_bwd: 0 p uniform, 1 x (read), 2 w [d] (read), 3 rstd [rows] (read), 4 dy (read),
//                5 dx (written or accumulated)
//
// Work split: TPR invocations per row (a power of two), WG / TPR rows per workgroup. Each
// invocation strides over the row, then the row's TPR partial sums are added up by group_sum
// (group_reduce.wgsl or group_reduce_subgroups.wgsl, put before this file by rmsnorm.ts). The
// workgroups form a 2-D grid, linear index wid.y·grid_x + wid.x.
// On GPUs TPR is 32 or WG (see rowReduceShape). CPU adapters get TPR = 1, one invocation per row:
// there group_sum returns its argument, with no workgroup memory touched and no barrier, which on
// SwiftShader would cost about 10 µs per four invocations (see attention.wgsl).

struct Params {
  rows: u32,
  d: u32,
  groups: u32,
  x_stride: u32,
  x_offset: u32,
  y_stride: u32,
  y_offset: u32,
  eps: f32,
  accumulate: u32,
  grid_x: u32,
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(5) var<storage, read_write> x_copy: array<f32>;

override WG: u32 = 256;   // invocations per workgroup
override TPR: u32 = 256;  // invocations per row; a power of two dividing WG

struct Slot {
  row: u32,
  lane: u32,
  valid: bool,
}

fn slot(tid: u32, wid: vec3<u32>) -> Slot {
  let row = (wid.y * p.grid_x + wid.x) * (WG / TPR) + tid / TPR;
  return Slot(row, tid % TPR, row < p.rows);
}

fn x_base(row: u32) -> u32 {
  return (row / p.groups) * p.x_stride + p.x_offset + (row % p.groups) * p.d;
}

fn y_base(row: u32) -> u32 {
  return (row / p.groups) * p.y_stride + p.y_offset + (row % p.groups) * p.d;
}

@compute @workgroup_size(WG)
fn rmsnorm_fwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  forward_row(tid, wid);
}

@compute @workgroup_size(WG)
fn rmsnorm_fwd_copy(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  forward_row(tid, wid);
  let s = slot(tid, wid);
  if (!s.valid) { return; }
  let xb = x_base(s.row);
  for (var i = s.lane; i < p.d; i += TPR) { x_copy[xb + i] = x[xb + i]; }
}

fn forward_row(tid: u32, wid: vec3<u32>) {
  let s = slot(tid, wid);
  let xb = x_base(s.row);
  var ss = 0.0;
  if (s.valid) {
    for (var i = s.lane; i < p.d; i += TPR) {
      let v = x[xb + i];
      ss += v * v;
    }
  }
  let total = group_sum(tid, TPR, ss);
  if (!s.valid) { return; }
  let r = inverseSqrt(total / f32(p.d) + p.eps);
  let yb = y_base(s.row);
  for (var i = s.lane; i < p.d; i += TPR) {
    y[yb + i] = w[i] * (x[xb + i] * r);
  }
  if (s.lane == 0u) { rstd_out[s.row] = r; }
}

@compute @workgroup_size(WG)
fn rmsnorm_bwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let s = slot(tid, wid);
  let xb = x_base(s.row);
  let yb = y_base(s.row);
  var acc = 0.0;
  if (s.valid) {
    for (var i = s.lane; i < p.d; i += TPR) {
      acc += dy[yb + i] * w[i] * x[xb + i];
    }
  }
  let total = group_sum(tid, TPR, acc);
  if (!s.valid) { return; }
  let r = rstd[s.row];
  let c = total * r * r / f32(p.d);
  for (var i = s.lane; i < p.d; i += TPR) {
    var g = r * (w[i] * dy[yb + i] - x[xb + i] * c);
    if (p.accumulate != 0u) { g += dx[xb + i]; }
    dx[xb + i] = g;
  }
}
