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
// rmsnorm_fwd_lora also computes the LoRA h = y·Aᵀ of the two or three adapted projections that
// read y (q and v, or q, k and v; gate and up), which lora_rows_multi would otherwise compute in a
// dispatch of its own:
//   h_m[r, j] = Σ_i y[r, i]·A_m[j, i]      A_m r_m×d at element a_m of lora_a,
//                                          h_m [rows, r_m] at element h_m of h
// The A are places in one buffer (the LoRA parameters' arena), the h in another (the layer's h
// arena), so the entry binds seven storage buffers. A module of rank 0 is none (two modules). Packed
// rows only (groups 1, no strides or offsets). It copies x like rmsnorm_fwd_copy when p.copy != 0
// (x_copy is a placeholder otherwise: inference normalises in place).
//
// Bindings, group 0:
//   rmsnorm_fwd: 0 p uniform, 1 x (read), 2 w [d] (read), 3 rstd [rows] (written), 4 y (written)
//   rmsnorm_fwd_copy: the same and 5 x_copy (written)
//   rmsnorm_fwd_lora: the same, 6 lora_a (read), 7 h (written)
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
  lora_r1: u32,  // rmsnorm_fwd_lora: the modules' ranks (0: no third), where their A start in
  lora_r2: u32,  // lora_a and their h in h, and whether to copy x
  lora_r3: u32,
  lora_a1: u32,
  lora_a2: u32,
  lora_a3: u32,
  lora_h1: u32,
  lora_h2: u32,
  lora_h3: u32,
  copy: u32,
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
@group(0) @binding(6) var<storage, read> lora_a: array<f32>;
@group(0) @binding(7) var<storage, read_write> h: array<f32>;

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
fn rmsnorm_fwd_lora(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  // forward_row without its early return: every invocation goes on to the h reductions, whose
  // group_sum2 every invocation of the workgroup must reach.
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
  let r = inverseSqrt(total / f32(p.d) + p.eps);
  if (s.valid) {
    let yb = y_base(s.row);
    for (var i = s.lane; i < p.d; i += TPR) {
      y[yb + i] = w[i] * (x[xb + i] * r);
      if (p.copy != 0u) { x_copy[xb + i] = x[xb + i]; }
    }
    if (s.lane == 0u) { rstd_out[s.row] = r; }
  }
  lora_h_row(tid, s, xb, r, p.lora_r1, p.lora_a1, p.lora_h1);
  lora_h_row(tid, s, xb, r, p.lora_r2, p.lora_a2, p.lora_h2);
  lora_h_row(tid, s, xb, r, p.lora_r3, p.lora_a3, p.lora_h3);
}

// h[row, j] for the R ranks of one A (at element a0 of lora_a; its h at element h0 of h), four
// ranks per pass over the row (two reductions). y's elements are recomputed exactly as stored (the
// same f32 operations), not read back.
fn lora_h_row(tid: u32, s: Slot, xb: u32, r: f32, R: u32, a0: u32, h0: u32) {
  for (var j = 0u; j < R; j += 4u) {
    let rows = a0 + min(vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(R - 1u)) * p.d;
    var acc = vec4<f32>(0.0);
    if (s.valid) {
      for (var i = s.lane; i < p.d; i += TPR) {
        let n = w[i] * (x[xb + i] * r);
        acc = fma(vec4<f32>(n), vec4<f32>(lora_a[rows.x + i], lora_a[rows.y + i], lora_a[rows.z + i], lora_a[rows.w + i]), acc);
      }
    }
    let t = vec4<f32>(group_sum2(tid, TPR, acc.xy), group_sum2(tid, TPR, acc.zw));
    if (s.valid && s.lane == 0u) {
      let o = h0 + s.row * R + j;
      for (var q = 0u; q < min(4u, R - j); q++) { h[o + q] = t[q]; }
    }
  }
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
