// matmul.wgsl: tiled matrix product for frozen weights, with an optional low-rank term.
//
//   C[M×N] = alpha · opA(A) · opW(W)  +  alpha2 · A2 · opW(B2)  +  beta · C  (+ bias[N])
//
//   opA(A) = A   when A is stored M×K, or Aᵀ when A is stored K×M (TRANS_A)
//   opW(W) = Wᵀ  when W is stored N×K (TRANS_W: a weight as nn.Linear stores it, out×in),
//            or W when W is stored K×N (the backward's dx = dy·W0)
//
// The second term is where LoRA fuses: the forward y = x·W0ᵀ + s·h·Bᵀ passes A2 = h (T×r) and
// B2 = B (out×r); the backward dx = dy·W0 + s·g·A passes A2 = g (T×r) and B2 = A (r×in). In
// both cases B2 has the same layout as W, so the r-long loop continues the same tile
// accumulators and the low-rank product never makes its own pass over C. K2 = 0 turns it off.
//
// Bindings, group 0:
//   0 p     uniform Params
//   1 a     A,  M×K or K×M       f32 (a4: the same memory as vec4, when the contiguous dim % 4 == 0)
//   2 w     W,  N×K or K×N       f32 (w4: as vec4), or f16 packed two per u32 (wh, wh4: 4 halves)
//   3 bias  N                    f32, read only when p.has_bias != 0
//   4 a2    A2, M×K2             f32
//   5 b2    B2, N×K2 or K2×N     f32
//   6 c     C,  M×N              f32, written; read first when p.beta != 0 (accumulate)
//
// Tiling: a workgroup of WG_X×WG_Y invocations owns a (4·WG_Y)×(4·WG_X) tile of C; each
// invocation keeps a 4×4 block in registers. K advances TK at a time through workgroup memory;
// both staged tiles are k-major, so the inner loop is an outer product of two vec4s. The vec4
// entry points load 16 bytes per access; they need the contiguous dimension of A and W to be a
// multiple of 4 (the host checks), so a vec4 is either wholly inside a row or wholly outside.

struct Params {
  M: u32,
  N: u32,
  K: u32,
  K2: u32,
  alpha: f32,
  alpha2: f32,
  beta: f32,
  has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> wh: array<u32>;
@group(0) @binding(2) var<storage, read> wh4: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> a2: array<f32>;
@group(0) @binding(5) var<storage, read> b2: array<f32>;
@group(0) @binding(6) var<storage, read_write> c: array<f32>;

override WG_X: u32 = 16;     // invocations along N; the tile is 4·WG_X columns
override WG_Y: u32 = 16;     // invocations along M; the tile is 4·WG_Y rows
override TK: u32 = 16;       // K step staged in workgroup memory (multiple of 4)
override TRANS_A: bool = false;
override TRANS_W: bool = true;

// Staged tiles, k-major: as_[k·WG_Y + i] holds rows 4i..4i+3 of column k.
var<workgroup> as_: array<vec4<f32>, TK * WG_Y>;
var<workgroup> ws_: array<vec4<f32>, TK * WG_X>;

var<private> acc: array<vec4<f32>, 4>;
var<private> tx: u32;
var<private> ty: u32;
var<private> tid: u32;
var<private> m0: u32;
var<private> n0: u32;

fn setup(lid: vec3<u32>, wid: vec3<u32>) {
  tx = lid.x;
  ty = lid.y;
  tid = lid.y * WG_X + lid.x;
  m0 = wid.y * WG_Y * 4u;
  n0 = wid.x * WG_X * 4u;
  acc = array<vec4<f32>, 4>();
}

// ---- staging one TK-slice of A -------------------------------------------------------------

fn stage_a(row: u32, kk: u32, v: f32) {
  as_[kk * WG_Y + row / 4u][row % 4u] = v;
}

fn load_a_scalar(k0: u32) {
  let rows = WG_Y * 4u;
  for (var e = tid; e < rows * TK; e += WG_X * WG_Y) {
    var row: u32;
    var kk: u32;
    var idx: u32;
    if (TRANS_A) { kk = e / rows; row = e % rows; idx = (k0 + kk) * p.M + m0 + row; }
    else { row = e / TK; kk = e % TK; idx = (m0 + row) * p.K + k0 + kk; }
    var v = 0.0;
    if (m0 + row < p.M && k0 + kk < p.K) { v = a[idx]; }
    stage_a(row, kk, v);
  }
}

fn load_a_vec4(k0: u32) {
  let rows = WG_Y * 4u;
  for (var e = tid; e < rows * TK / 4u; e += WG_X * WG_Y) {
    if (TRANS_A) {
      let kk = e / WG_Y;
      let q = e % WG_Y;
      var v = vec4<f32>(0.0);
      if (k0 + kk < p.K && m0 + q * 4u < p.M) { v = a4[((k0 + kk) * p.M + m0 + q * 4u) / 4u]; }
      as_[kk * WG_Y + q] = v;
    } else {
      let row = e / (TK / 4u);
      let kq = (e % (TK / 4u)) * 4u;
      var v = vec4<f32>(0.0);
      if (m0 + row < p.M && k0 + kq < p.K) { v = a4[((m0 + row) * p.K + k0 + kq) / 4u]; }
      for (var i = 0u; i < 4u; i++) { stage_a(row, kq + i, v[i]); }
    }
  }
}

// ---- staging one TK-slice of W (f32 or packed f16) ------------------------------------------

fn stage_w(col: u32, kk: u32, v: f32) {
  ws_[kk * WG_X + col / 4u][col % 4u] = v;
}

// Element index of W(k, n) as stored, or 0xffffffff when outside.
fn w_index(k: u32, n: u32) -> u32 {
  if (k >= p.K || n >= p.N) { return 0xffffffffu; }
  if (TRANS_W) { return n * p.K + k; }
  return k * p.N + n;
}

fn w_tile_coords(e: u32) -> vec2<u32> {
  // (column in tile, k in tile); consecutive e walk the stored contiguous dimension.
  let cols = WG_X * 4u;
  if (TRANS_W) { return vec2<u32>(e / TK, e % TK); }
  return vec2<u32>(e % cols, e / cols);
}

fn half_at(idx: u32) -> f32 {
  return unpack2x16float(wh[idx / 2u])[idx % 2u];
}

fn load_w_scalar(k0: u32) {
  for (var e = tid; e < WG_X * 4u * TK; e += WG_X * WG_Y) {
    let t = w_tile_coords(e);
    let idx = w_index(k0 + t.y, n0 + t.x);
    var v = 0.0;
    if (idx != 0xffffffffu) { v = w[idx]; }
    stage_w(t.x, t.y, v);
  }
}

fn load_w16_scalar(k0: u32) {
  for (var e = tid; e < WG_X * 4u * TK; e += WG_X * WG_Y) {
    let t = w_tile_coords(e);
    let idx = w_index(k0 + t.y, n0 + t.x);
    var v = 0.0;
    if (idx != 0xffffffffu) { v = half_at(idx); }
    stage_w(t.x, t.y, v);
  }
}

// Stages one vec4 of W that starts at tile coords (col, kk) along the contiguous dimension.
fn stage_w_vec4(col: u32, kk: u32, v: vec4<f32>) {
  if (TRANS_W) {
    for (var i = 0u; i < 4u; i++) { stage_w(col, kk + i, v[i]); }
  } else {
    ws_[kk * WG_X + col / 4u] = v;
  }
}

fn w_vec4_coords(e: u32) -> vec2<u32> {
  if (TRANS_W) { return vec2<u32>(e / (TK / 4u), (e % (TK / 4u)) * 4u); }
  return vec2<u32>((e % WG_X) * 4u, e / WG_X);
}

fn load_w_vec4(k0: u32) {
  for (var e = tid; e < WG_X * TK; e += WG_X * WG_Y) {
    let t = w_vec4_coords(e);
    let idx = w_index(k0 + t.y, n0 + t.x);
    var v = vec4<f32>(0.0);
    if (idx != 0xffffffffu) { v = w4[idx / 4u]; }
    stage_w_vec4(t.x, t.y, v);
  }
}

fn load_w16_vec4(k0: u32) {
  for (var e = tid; e < WG_X * TK; e += WG_X * WG_Y) {
    let t = w_vec4_coords(e);
    let idx = w_index(k0 + t.y, n0 + t.x);
    var v = vec4<f32>(0.0);
    if (idx != 0xffffffffu) {
      let q = wh4[idx / 4u];
      v = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
    }
    stage_w_vec4(t.x, t.y, v);
  }
}

// ---- the product ----------------------------------------------------------------------------

fn multiply_staged() {
  for (var k = 0u; k < TK; k++) {
    let av = as_[k * WG_Y + ty];
    let wv = ws_[k * WG_X + tx];
    acc[0] = fma(vec4<f32>(av.x), wv, acc[0]);
    acc[1] = fma(vec4<f32>(av.y), wv, acc[1]);
    acc[2] = fma(vec4<f32>(av.z), wv, acc[2]);
    acc[3] = fma(vec4<f32>(av.w), wv, acc[3]);
  }
}

// The low-rank term: scales what was accumulated by alpha, then continues with alpha2·A2·opW(B2).
fn low_rank_term() {
  for (var i = 0u; i < 4u; i++) { acc[i] *= p.alpha; }
  let rows = WG_Y * 4u;
  for (var k0 = 0u; k0 < p.K2; k0 += TK) {
    for (var e = tid; e < rows * TK; e += WG_X * WG_Y) {
      let row = e / TK;
      let kk = e % TK;
      var v = 0.0;
      if (m0 + row < p.M && k0 + kk < p.K2) { v = p.alpha2 * a2[(m0 + row) * p.K2 + k0 + kk]; }
      stage_a(row, kk, v);
    }
    for (var e = tid; e < WG_X * 4u * TK; e += WG_X * WG_Y) {
      let t = w_tile_coords(e);
      let k = k0 + t.y;
      let n = n0 + t.x;
      var v = 0.0;
      if (k < p.K2 && n < p.N) {
        if (TRANS_W) { v = b2[n * p.K2 + k]; } else { v = b2[k * p.N + n]; }
      }
      stage_w(t.x, t.y, v);
    }
    workgroupBarrier();
    multiply_staged();
    workgroupBarrier();
  }
}

fn store() {
  for (var i = 0u; i < 4u; i++) {
    let m = m0 + ty * 4u + i;
    if (m >= p.M) { break; }
    for (var j = 0u; j < 4u; j++) {
      let n = n0 + tx * 4u + j;
      if (n >= p.N) { break; }
      var v = acc[i][j];
      if (p.has_bias != 0u) { v += bias[n]; }
      if (p.beta != 0.0) { v += p.beta * c[m * p.N + n]; }
      c[m * p.N + n] = v;
    }
  }
}

// ---- entry points: {scalar, vec4} loads × {f32, f16} W ------------------------------------

@compute @workgroup_size(WG_X, WG_Y)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  setup(lid, wid);
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    load_a_scalar(k0);
    load_w_scalar(k0);
    workgroupBarrier();
    multiply_staged();
    workgroupBarrier();
  }
  low_rank_term();
  store();
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_vec4(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  setup(lid, wid);
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    load_a_vec4(k0);
    load_w_vec4(k0);
    workgroupBarrier();
    multiply_staged();
    workgroupBarrier();
  }
  low_rank_term();
  store();
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_w16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  setup(lid, wid);
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    load_a_scalar(k0);
    load_w16_scalar(k0);
    workgroupBarrier();
    multiply_staged();
    workgroupBarrier();
  }
  low_rank_term();
  store();
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_vec4_w16(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  setup(lid, wid);
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    load_a_vec4(k0);
    load_w16_vec4(k0);
    workgroupBarrier();
    multiply_staged();
    workgroupBarrier();
  }
  low_rank_term();
  store();
}
