// layernorm.wgsl: layer normalisation of rows of length d (GPT-2: ln_1, ln_2, ln_f; eps 1e-5).
//
//   forward   mean[r] = Σ_i x[r,i] / d
//             rstd[r] = 1 / sqrt(Σ_i (x[r,i] − mean[r])² / d + eps)     (biased variance, two passes)
//             y[r,i]  = (x[r,i] − mean[r]) · rstd[r] · w[i] + b[i]       (b only when p.has_bias != 0)
//   backward  x̂ = (x − mean)·rstd,  g = dy·w
//             dx[r,i] = rstd·(g_i − Σ_j g_j / d − x̂_i · Σ_j g_j·x̂_j / d)
//
// The weight w and bias b are frozen: the backward produces dx only, never dw or db.
// The forward saves mean and rstd (one f32 each per row); the backward also reads x again.
// y, mean and rstd are written. dx is written, or accumulated (dx += ...) when p.accumulate != 0.
//
// Bindings, group 0 (rows packed back to back, [rows, d]):
//   layernorm_fwd: 0 p uniform, 1 x [rows,d] (read), 2 w [d] (read), 3 b [d] (read),
//                  4 mean [rows] (written), 5 rstd [rows] (written), 6 y [rows,d] (written)
//   layernorm_bwd: 0 p uniform, 1 x [rows,d] (read), 2 w [d] (read), 3 mean [rows] (read),
//                  4 rstd [rows] (read), 5 dy [rows,d] (read), 6 dx [rows,d] (written or accumulated)
//   layernorm_fwd_copy: as layernorm_fwd, and 7 x_copy [rows,d] (written): a copy of x, where the
//                  projection after the block accumulates (the residual add without a dispatch; see
//                  rmsnorm.wgsl)
//
// Work split as in rmsnorm.wgsl: TPR invocations per row, WG / TPR rows per workgroup, partial
// sums added by group_sum / group_sum2 (group_reduce.wgsl or its subgroup twin, put first by
// layernorm.ts), workgroups on a 2-D grid (wid.y·grid_x + wid.x); TPR = 1 on CPU adapters, where
// the sums are the invocation's own, with no workgroup memory touched and no barrier.

struct Params {
  rows: u32,
  d: u32,
  eps: f32,
  has_bias: u32,
  accumulate: u32,
  grid_x: u32,
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read_write> x_copy: array<f32>;

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

@compute @workgroup_size(WG)
fn layernorm_fwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  forward_row(tid, wid);
}

@compute @workgroup_size(WG)
fn layernorm_fwd_copy(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  forward_row(tid, wid);
  let s = slot(tid, wid);
  if (!s.valid) { return; }
  let base = s.row * p.d;
  for (var i = s.lane; i < p.d; i += TPR) { x_copy[base + i] = x[base + i]; }
}

fn forward_row(tid: u32, wid: vec3<u32>) {
  let s = slot(tid, wid);
  let base = s.row * p.d;
  let inv_d = 1.0 / f32(p.d);
  var sum = 0.0;
  if (s.valid) {
    for (var i = s.lane; i < p.d; i += TPR) { sum += x[base + i]; }
  }
  let mu = group_sum(tid, TPR, sum) * inv_d;
  var sq = 0.0;
  if (s.valid) {
    for (var i = s.lane; i < p.d; i += TPR) {
      let c = x[base + i] - mu;
      sq += c * c;
    }
  }
  let variance = group_sum(tid, TPR, sq) * inv_d;
  if (!s.valid) { return; }
  let r = inverseSqrt(variance + p.eps);
  for (var i = s.lane; i < p.d; i += TPR) {
    var v = (x[base + i] - mu) * r * w[i];
    if (p.has_bias != 0u) { v += b[i]; }
    y[base + i] = v;
  }
  if (s.lane == 0u) {
    mean_out[s.row] = mu;
    rstd_out[s.row] = r;
  }
}

@compute @workgroup_size(WG)
fn layernorm_bwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let s = slot(tid, wid);
  let base = s.row * p.d;
  var mu = 0.0;
  var r = 0.0;
  var acc = vec2<f32>(0.0);   // (Σ g, Σ g·x̂)
  if (s.valid) {
    mu = mean[s.row];
    r = rstd[s.row];
    for (var i = s.lane; i < p.d; i += TPR) {
      let g = dy[base + i] * w[i];
      acc += vec2<f32>(g, g * ((x[base + i] - mu) * r));
    }
  }
  let sums = group_sum2(tid, TPR, acc) / f32(p.d);
  if (!s.valid) { return; }
  for (var i = s.lane; i < p.d; i += TPR) {
    let xhat = (x[base + i] - mu) * r;
    var v = r * (dy[base + i] * w[i] - sums.x - xhat * sums.y);
    if (p.accumulate != 0u) { v += dx[base + i]; }
    dx[base + i] = v;
  }
}
