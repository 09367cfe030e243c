// lora_matmul.wgsl: the thin, rank-r products of a LoRA layer.
//
// For x (T×in), frozen W0 (out×in), A (r×in), B (out×r), s = alpha/r (or alpha/√r):
//   forward   h  = x·Aᵀ          (T×r)   lora_rows, L = A stored r×in   (TRANS_L)   saved for the backward
//             y  = x·W0ᵀ + s·h·Bᵀ         matmul.wgsl (the h·Bᵀ term fused into W0's tile loop)
//   backward  g  = dy·B          (T×r)   lora_rows, L = B stored out×r
//             dB = s·dyᵀ·h       (out×r) lora_cols, U = dy, V = h, OUT_NR  (written [n][j])
//             dA = s·gᵀ·x        (r×in)  lora_cols, U = x,  V = g          (written [j][n])
//             dx = dy·W0 + s·g·A          matmul.wgsl (the g·A term fused likewise)
// W0 gets no gradient. Outputs are written, or accumulated when p.beta = 1 (gradient
// accumulation over micro-batches).
//
// g and dB read the same dy and neither reads the other, so `lora_g_db` does both in one dispatch:
// its first p.rows_groups workgroups are lora_rows for g (x = dy, l = B, out = g), the rest
// lora_cols for dB (U = dy, V = h from binding 4, written to db at binding 5 with p.cols_alpha and
// p.cols_beta). The branch is on the workgroup id, uniform across the workgroup, so each role keeps
// its barriers.
//
// These shapes defeat a square-tiled matmul (one side is r = 1..128 wide), so each kernel
// reduces along the long dimension instead:
//   lora_rows: C[M×R] = X·opL(L). An invocation group of KS owns 4 rows × 4 ranks and splits K,
//              each keeping a 4×4 block of partial sums, then reduces them in workgroup memory
//              (KS = WG on GPUs; KS = 1 on CPU adapters: one invocation per block, whole K, no
//              workgroup memory or barrier, which SwiftShader charges ~10 µs per 4 invocations).
//   lora_cols: C = alpha·Uᵀ·V (+ beta·C), U (T×N), V (T×R), reducing over T. An invocation owns 4
//              consecutive columns n × 4 ranks; the V rows it needs are the same for the whole
//              workgroup and are staged in workgroup memory TT rows at a time (STAGE; on CPU
//              adapters each invocation reads them itself, which drops the workgroup memory and
//              the barriers).

struct Params {
  M: u32,      // lora_rows: rows of X and C      lora_cols: T (the reduced dimension)
  N: u32,      // lora_rows: unused                lora_cols: columns of U
  K: u32,      // lora_rows: the reduced dimension lora_cols: unused
  R: u32,      // rank
  alpha: f32,
  beta: f32,
  cols_alpha: f32,   // lora_g_db: alpha and beta of the dB role (p.alpha, p.beta are g's)
  cols_beta: f32,
  rows_groups: u32,  // lora_g_db: workgroups of the g role, the first of the grid
  rows_gx: u32,      //   its grid width (rank blocks)
  cols_gx: u32,      //   the dB role's grid width (column blocks)
  grid_x: u32,       //   workgroups per row of the dispatch grid
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // rows: X (M×K)     cols: U (T×N)
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> l: array<f32>;        // rows: L (R×K or K×R)  cols: V (T×R)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// lora_g_db's dB role: V (h) and its output. The other entries bind placeholders here.
@group(0) @binding(4) var<storage, read> hv: array<f32>;
@group(0) @binding(5) var<storage, read_write> db: array<f32>;

override WG: u32 = 64;          // invocations per workgroup; a power of two
override KS: u32 = 64;          // lora_rows: invocations splitting k per 4×4 block; a power of two dividing WG
override TRANS_L: bool = true;  // lora_rows: L stored R×K (A) rather than K×R (B)
override OUT_NR: bool = false;  // lora_cols: write C[n][j] (N×R) rather than C[j][n] (R×N)
override TT: u32 = 16;          // lora_cols: rows of V staged per step
override STAGE: bool = true;    // lora_cols: stage V rows in workgroup memory (false on CPU adapters)
override COLS_H: bool = false;  // lora_cols reads V from hv and writes db (lora_g_db's dB role)

var<workgroup> partial: array<array<vec4<f32>, 4>, WG>;
var<workgroup> v_rows: array<vec4<f32>, TT>;

// Loads for lora_rows. Row m and rank j are clamped into range by the caller, so no load is
// conditional; results of clamped rows and ranks are never stored.
fn l_at(j: u32, k: u32) -> f32 {
  if (TRANS_L) { return l[j * p.K + k]; }
  return l[k * p.R + j];
}

// C[m][j] = Σ_k X[m][k]·L(j, k) for m in m0..m0+3 and j in j0..j0+3. The workgroup holds WG / KS
// such 4×4 blocks (consecutive row blocks, the same ranks); the KS invocations of a block split k
// and add their partial sums as a tree in workgroup memory. With KS = 1 (CPU adapters) there is
// no tree, hence no workgroup memory and no barrier.
@compute @workgroup_size(WG)
fn lora_rows(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  rows_block(tid, wid.x, wid.y);
}

fn rows_block(tid: u32, wx: u32, wy: u32) {
  let j0 = wx * 4u;
  let m0 = (wy * (WG / KS) + tid / KS) * 4u;
  let lane = tid % KS;
  let last_m = p.M - 1u;
  let last_j = p.R - 1u;
  let m = min(vec4<u32>(m0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last_m)) * p.K;
  let j = min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last_j));
  var acc = array<vec4<f32>, 4>();   // acc[i][jj]: row m0+i, rank j0+jj
  for (var k = lane; k < p.K; k += KS) {
    let lv = vec4<f32>(l_at(j.x, k), l_at(j.y, k), l_at(j.z, k), l_at(j.w, k));
    acc[0] = fma(vec4<f32>(x[m.x + k]), lv, acc[0]);
    acc[1] = fma(vec4<f32>(x[m.y + k]), lv, acc[1]);
    acc[2] = fma(vec4<f32>(x[m.z + k]), lv, acc[2]);
    acc[3] = fma(vec4<f32>(x[m.w + k]), lv, acc[3]);
  }
  if (KS > 1u) {
    partial[tid] = acc;
    workgroupBarrier();
    for (var stride = KS / 2u; stride > 0u; stride /= 2u) {
      if (lane < stride) {
        for (var i = 0u; i < 4u; i++) { partial[tid][i] += partial[tid + stride][i]; }
      }
      workgroupBarrier();
    }
    acc = partial[tid - lane];
  }
  if (lane == 0u) {
    for (var i = 0u; i < 4u; i++) {
      for (var jj = 0u; jj < 4u; jj++) {
        let mm = m0 + i;
        let jr = j0 + jj;
        if (mm < p.M && jr < p.R) {
          var v = p.alpha * acc[i][jj];
          if (p.beta != 0.0) { v += p.beta * out[mm * p.R + jr]; }
          out[mm * p.R + jr] = v;
        }
      }
    }
  }
}

// V[i] (flat): l, or hv in lora_g_db's dB role.
fn v_at(i: u32) -> f32 {
  if (COLS_H) { return hv[i]; }
  return l[i];
}

fn v_row(t: u32, j0: u32) -> vec4<f32> {
  var v = vec4<f32>(0.0);
  for (var jj = 0u; jj < 4u; jj++) {
    if (j0 + jj < p.R) { v[jj] = v_at(t * p.R + j0 + jj); }
  }
  return v;
}

fn store_cols(n0: u32, j0: u32, acc: array<vec4<f32>, 4>) {
  // acc[i][jj]: column n0+i, rank j0+jj
  for (var i = 0u; i < 4u; i++) {
    let n = n0 + i;
    if (n >= p.N) { break; }
    for (var jj = 0u; jj < 4u; jj++) {
      let j = j0 + jj;
      if (j >= p.R) { break; }
      var idx: u32;
      if (OUT_NR) { idx = n * p.R + j; } else { idx = j * p.N + n; }
      if (COLS_H) {
        var v = p.cols_alpha * acc[i][jj];
        if (p.cols_beta != 0.0) { v += p.cols_beta * db[idx]; }
        db[idx] = v;
      } else {
        var v = p.alpha * acc[i][jj];
        if (p.beta != 0.0) { v += p.beta * out[idx]; }
        out[idx] = v;
      }
    }
  }
}

// V row t at ranks j (clamped into range: the clamped ranks are never stored).
fn v_direct(t: u32, j: vec4<u32>) -> vec4<f32> {
  let b = t * p.R;
  return vec4<f32>(v_at(b + j.x), v_at(b + j.y), v_at(b + j.z), v_at(b + j.w));
}

fn clamped_ranks(j0: u32) -> vec4<u32> {
  return min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.R - 1u));
}

// C(n, j) = alpha · Σ_t U[t][n]·V[t][j] for n in n0..n0+3, j in j0..j0+3.
@compute @workgroup_size(WG)
fn lora_cols(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  cols_block(tid, wid.x, wid.y);
}

fn cols_block(tid: u32, wx: u32, wy: u32) {
  let n0 = (wx * WG + tid) * 4u;
  let j0 = wy * 4u;
  var acc = array<vec4<f32>, 4>();
  if (!STAGE) {
    let j = clamped_ranks(j0);
    let n = min(vec4<u32>(n0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.N - 1u));
    for (var t = 0u; t < p.M; t++) {
      let vv = v_direct(t, j);
      let b = t * p.N;
      acc[0] = fma(vec4<f32>(x[b + n.x]), vv, acc[0]);
      acc[1] = fma(vec4<f32>(x[b + n.y]), vv, acc[1]);
      acc[2] = fma(vec4<f32>(x[b + n.z]), vv, acc[2]);
      acc[3] = fma(vec4<f32>(x[b + n.w]), vv, acc[3]);
    }
    store_cols(n0, j0, acc);
    return;
  }
  for (var t0 = 0u; t0 < p.M; t0 += TT) {
    for (var r = tid; r < TT; r += WG) {
      if (t0 + r < p.M) { v_rows[r] = v_row(t0 + r, j0); } else { v_rows[r] = vec4<f32>(0.0); }
    }
    workgroupBarrier();
    for (var r = 0u; r < TT && t0 + r < p.M; r++) {
      let t = t0 + r;
      let vv = v_rows[r];
      for (var i = 0u; i < 4u; i++) {
        var u = 0.0;
        if (n0 + i < p.N) { u = x[t * p.N + n0 + i]; }
        acc[i] = fma(vec4<f32>(u), vv, acc[i]);
      }
    }
    workgroupBarrier();
  }
  store_cols(n0, j0, acc);
}

// lora_cols with 16-byte loads of U; needs N % 4 == 0.
@compute @workgroup_size(WG)
fn lora_cols_vec4(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let n0 = (wid.x * WG + tid) * 4u;
  let j0 = wid.y * 4u;
  var acc = array<vec4<f32>, 4>();
  if (!STAGE) {
    if (n0 < p.N) {
      let j = clamped_ranks(j0);
      for (var t = 0u; t < p.M; t++) {
        let vv = v_direct(t, j);
        let u = x4[(t * p.N + n0) / 4u];
        acc[0] = fma(vec4<f32>(u.x), vv, acc[0]);
        acc[1] = fma(vec4<f32>(u.y), vv, acc[1]);
        acc[2] = fma(vec4<f32>(u.z), vv, acc[2]);
        acc[3] = fma(vec4<f32>(u.w), vv, acc[3]);
      }
    }
    store_cols(n0, j0, acc);
    return;
  }
  for (var t0 = 0u; t0 < p.M; t0 += TT) {
    for (var r = tid; r < TT; r += WG) {
      if (t0 + r < p.M) { v_rows[r] = v_row(t0 + r, j0); } else { v_rows[r] = vec4<f32>(0.0); }
    }
    workgroupBarrier();
    if (n0 < p.N) {
      for (var r = 0u; r < TT && t0 + r < p.M; r++) {
        let vv = v_rows[r];
        let u = x4[((t0 + r) * p.N + n0) / 4u];
        acc[0] = fma(vec4<f32>(u.x), vv, acc[0]);
        acc[1] = fma(vec4<f32>(u.y), vv, acc[1]);
        acc[2] = fma(vec4<f32>(u.z), vv, acc[2]);
        acc[3] = fma(vec4<f32>(u.w), vv, acc[3]);
      }
    }
    workgroupBarrier();
  }
  store_cols(n0, j0, acc);
}

// g = dy·B and dB = s·dyᵀ·h in one dispatch (see the header): lora_rows' blocks, then lora_cols'.
@compute @workgroup_size(WG)
fn lora_g_db(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let idx = wid.y * p.grid_x + wid.x;
  if (idx < p.rows_groups) {
    rows_block(tid, idx % p.rows_gx, idx / p.rows_gx);
  } else {
    let c = idx - p.rows_groups;
    let cy = c / p.cols_gx;
    if (cy * 4u < p.R) { cols_block(tid, c % p.cols_gx, cy); }
  }
}
