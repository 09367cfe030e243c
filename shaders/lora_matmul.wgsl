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
// Several products in one dispatch, each workgroup doing one of them (chosen by its id, uniform
// across the workgroup, so every role keeps its barriers). A role is one module's L or V and its
// output, with its own rank, alpha and beta (p.roles[i]): role 0 reads l and writes out, role 1 hv
// and db, role 2 l3 and out3.
//   lora_g_db        g = dy·B and dB = s·dyᵀ·h read the same dy and neither reads the other: the
//                    first p.rows_groups workgroups are lora_rows for g (role 0: x = dy, l = B,
//                    out = g), the rest lora_cols for dB (role 1: U = dy, hv = h, db = dB).
//   lora_rows_multi  h = x·Aᵀ of up to three modules reading the same x (q, k, v; gate, up).
//   lora_cols_multi  dA = s·gᵀ·x of up to three modules reading the same x.
//   lora_g_db_pair   lora_g_db of two modules at once (q and v; gate and up), each with its own
//                    dy (PAIR): role 0 g₁ = dy₁·B₁ (x, l, out), role 1 dB₁ (x, hv, db), role 2
//                    g₂ = dy₂·B₂ (x2, l, out3), role 3 dB₂ (x2, l3 = h₂, db). B₁ and B₂ are two
//                    places in one buffer (the LoRA parameters' arena), dB₁ and dB₂ likewise (the
//                    gradients'), addressed by the roles' offsets: eight storage buffers, within
//                    WebGPU's default limit.
//   lora_g_db_many   lora_g_db of up to three modules at once (q, k and v) whose every operand kind
//                    is places of one buffer (MANY): even roles 2i run lora_rows for g_i (X = dy_i
//                    at x_off in x, L = B_i at in_off in l, g_i at out_off in out), odd roles 2i + 1
//                    lora_cols for dB_i (U = dy_i at x_off, V = h_i at in_off in hv, dB_i at
//                    out_off in db). Five storage buffers; the others are placeholders.
//
// These shapes defeat a square-tiled matmul (one side is r = 1..128 wide), so each kernel
// reduces along the long dimension instead:
//   lora_rows: C[M×R] = X·opL(L). An invocation group of KS owns 4 rows × 4 ranks and splits K,
//              each keeping a 4×4 block of partial sums, then adds them up with group_sum4x4
//              (group_reduce.wgsl, which lora_matmul.ts puts before this file: a workgroup-memory
//              tree, or subgroup sums where the GPU has them). KS = WG on GPUs; KS = 1 on CPU
//              adapters: one invocation per block, whole K, no barrier, which SwiftShader charges
//              ~10 µs per 4 invocations.
//   lora_cols: C = alpha·Uᵀ·V (+ beta·C), U (T×N), V (T×R), reducing over T. An invocation owns 4
//              consecutive columns n × 4 ranks; the V rows it needs are the same for the whole
//              workgroup and are staged in workgroup memory TT rows at a time (STAGE; on CPU
//              adapters each invocation reads them itself, which drops the workgroup memory and
//              the barriers).

struct Role {
  R: u32,       // rank
  start: u32,   // the role's first workgroup (flat index) in the multi entries and lora_g_db
  gx: u32,      // its grid width: rank blocks (rows) or column blocks (cols)
  count: u32,   // its workgroups
  alpha: f32,
  beta: f32,
  in_off: u32,  // where the role's L (or V) starts in its binding, in elements
  out_off: u32, // where its output starts in its binding
  n: u32,       // PAIR, MANY: the role's K (lora_rows) or N (lora_cols); the others use p.K and p.N
  x_off: u32,   // MANY: where the role's X (or U) starts in x, in elements
  _pad1: u32,
  _pad2: u32,
}

struct Params {
  M: u32,      // lora_rows: rows of X and C      lora_cols: T (the reduced dimension)
  N: u32,      // lora_rows: unused                lora_cols: columns of U     (all but PAIR)
  K: u32,      // lora_rows: the reduced dimension lora_cols: unused           (all but PAIR)
  grid_x: u32, // workgroups per row of the dispatch grid (the multi entries and lora_g_db)
  roles: array<Role, 6>,  // NROLES
}

const NROLES: u32 = 6u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // rows: X (M×K)     cols: U (T×N)
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> l: array<f32>;        // rows: L (R×K or K×R)  cols: V (T×R)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// Roles 1 and 2 (see the header); entries with fewer roles bind placeholders here.
@group(0) @binding(4) var<storage, read> hv: array<f32>;
@group(0) @binding(5) var<storage, read_write> db: array<f32>;
@group(0) @binding(6) var<storage, read> l3: array<f32>;
@group(0) @binding(7) var<storage, read_write> out3: array<f32>;
// lora_g_db_pair's second dy (roles 2 and 3); the other entries bind a placeholder.
@group(0) @binding(8) var<storage, read> x2: array<f32>;

override WG: u32 = 64;          // invocations per workgroup; a power of two
override KS: u32 = 64;          // lora_rows: invocations splitting k per 4×4 block; a power of two dividing WG
override TRANS_L: bool = true;  // lora_rows: L stored R×K (A) rather than K×R (B)
override OUT_NR: bool = false;  // lora_cols: write C[n][j] (N×R) rather than C[j][n] (R×N)
override TT: u32 = 16;          // lora_cols: rows of V staged per step
override STAGE: bool = true;    // lora_cols: stage V rows in workgroup memory (false on CPU adapters)
override PAIR: bool = false;    // lora_g_db_pair's role-to-binding map (see the header)
override MANY: bool = false;    // lora_g_db_many's (see the header)

var<workgroup> v_rows: array<vec4<f32>, TT>;

// The role this workgroup computes, its rank, its K (rows) or N (cols), and where its input and
// output start (set by every entry point before any load). Only PAIR's roles differ in K, N and
// offsets; the other entries keep them uniform (p.K, p.N, 0), which a CPU driver running
// invocations as SIMD lanes needs to see: a loop bound or address from a private variable
// counts as varying per lane there (lora_g_db ran about 1.8× slower on SwiftShader with them).
var<private> role: u32;
var<private> rank: u32;
var<private> pair_dim: u32;
var<private> in_off: u32;
var<private> out_off: u32;
var<private> x_off: u32;

fn kdim() -> u32 {
  if (PAIR || MANY) { return pair_dim; }
  return p.K;
}
fn ndim() -> u32 {
  if (PAIR || MANY) { return pair_dim; }
  return p.N;
}

// X (lora_rows) or U (lora_cols) of the role, flat: x, or x2 for lora_g_db_pair's second module.
fn x_at(i: u32) -> f32 {
  if (PAIR && role >= 2u) { return x2[i]; }
  if (MANY) { return x[x_off + i]; }
  return x[i];
}

// Which binding holds the role's L or V (0 l, 1 hv, 2 l3) and its output (0 out, 1 db, 2 out3).
fn in_slot() -> u32 {
  if (PAIR) { return select(select(0u, 1u, role == 1u), 2u, role == 3u); }
  if (MANY) { return role % 2u; }
  return role;
}
fn out_slot() -> u32 {
  if (PAIR) { return select(select(0u, 1u, role == 1u || role == 3u), 2u, role == 2u); }
  if (MANY) { return role % 2u; }
  return role;
}

// L (lora_rows) or V (lora_cols) of the role, flat.
fn role_in(i: u32) -> f32 {
  var j = i;
  if (PAIR || MANY) { j += in_off; }
  switch in_slot() {
    case 1u: { return hv[j]; }
    case 2u: { return l3[j]; }
    default: { return l[j]; }
  }
}

// out[i] = alpha·v + beta·out[i] for the role's output.
fn role_store(i: u32, v: f32) {
  let a = p.roles[role].alpha;
  let b = p.roles[role].beta;
  var j = i;
  if (PAIR || MANY) { j += out_off; }
  switch out_slot() {
    case 1u: {
      var y = a * v;
      if (b != 0.0) { y += b * db[j]; }
      db[j] = y;
    }
    case 2u: {
      var y = a * v;
      if (b != 0.0) { y += b * out3[j]; }
      out3[j] = y;
    }
    default: {
      var y = a * v;
      if (b != 0.0) { y += b * out[j]; }
      out[j] = y;
    }
  }
}

fn set_role(r: u32) {
  role = r;
  rank = p.roles[r].R;
  if (PAIR || MANY) {
    pair_dim = p.roles[r].n;
    in_off = p.roles[r].in_off;
    out_off = p.roles[r].out_off;
  }
  if (MANY) { x_off = p.roles[r].x_off; }
}

// Loads for lora_rows. Row m and rank j are clamped into range by the caller, so no load is
// conditional; results of clamped rows and ranks are never stored.
fn l_at(j: u32, k: u32) -> f32 {
  if (TRANS_L) { return role_in(j * kdim() + k); }
  return role_in(k * rank + j);
}

// C[m][j] = Σ_k X[m][k]·L(j, k) for m in m0..m0+3 and j in j0..j0+3. The workgroup holds WG / KS
// such 4×4 blocks (consecutive row blocks, the same ranks); the KS invocations of a block split k
// and add their partial sums with group_sum4x4 (a run of KS invocations). With KS = 1 (CPU
// adapters) there is no reduction, hence no barrier.
@compute @workgroup_size(WG)
fn lora_rows(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  set_role(0u);
  rows_block(tid, wid.x, wid.y);
}

fn rows_block(tid: u32, wx: u32, wy: u32) {
  let j0 = wx * 4u;
  let m0 = (wy * (WG / KS) + tid / KS) * 4u;
  let lane = tid % KS;
  let last_m = p.M - 1u;
  let last_j = rank - 1u;
  let m = min(vec4<u32>(m0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last_m)) * kdim();
  let j = min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last_j));
  var acc = array<vec4<f32>, 4>();   // acc[i][jj]: row m0+i, rank j0+jj
  for (var k = lane; k < kdim(); k += KS) {
    let lv = vec4<f32>(l_at(j.x, k), l_at(j.y, k), l_at(j.z, k), l_at(j.w, k));
    acc[0] = fma(vec4<f32>(x_at(m.x + k)), lv, acc[0]);
    acc[1] = fma(vec4<f32>(x_at(m.y + k)), lv, acc[1]);
    acc[2] = fma(vec4<f32>(x_at(m.z + k)), lv, acc[2]);
    acc[3] = fma(vec4<f32>(x_at(m.w + k)), lv, acc[3]);
  }
  if (KS > 1u) { acc = group_sum4x4(tid, KS, acc); }
  if (lane == 0u) {
    for (var i = 0u; i < 4u; i++) {
      for (var jj = 0u; jj < 4u; jj++) {
        let mm = m0 + i;
        let jr = j0 + jj;
        if (mm < p.M && jr < rank) { role_store(mm * rank + jr, acc[i][jj]); }
      }
    }
  }
}

fn v_row(t: u32, j0: u32) -> vec4<f32> {
  var v = vec4<f32>(0.0);
  for (var jj = 0u; jj < 4u; jj++) {
    if (j0 + jj < rank) { v[jj] = role_in(t * rank + j0 + jj); }
  }
  return v;
}

fn store_cols(n0: u32, j0: u32, acc: array<vec4<f32>, 4>) {
  // acc[i][jj]: column n0+i, rank j0+jj
  for (var i = 0u; i < 4u; i++) {
    let n = n0 + i;
    if (n >= ndim()) { break; }
    for (var jj = 0u; jj < 4u; jj++) {
      let j = j0 + jj;
      if (j >= rank) { break; }
      var idx: u32;
      if (OUT_NR) { idx = n * rank + j; } else { idx = j * ndim() + n; }
      role_store(idx, acc[i][jj]);
    }
  }
}

// V row t at ranks j (clamped into range: the clamped ranks are never stored).
fn v_direct(t: u32, j: vec4<u32>) -> vec4<f32> {
  let b = t * rank;
  return vec4<f32>(role_in(b + j.x), role_in(b + j.y), role_in(b + j.z), role_in(b + j.w));
}

fn clamped_ranks(j0: u32) -> vec4<u32> {
  return min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(rank - 1u));
}

// C(n, j) = alpha · Σ_t U[t][n]·V[t][j] for n in n0..n0+3, j in j0..j0+3.
@compute @workgroup_size(WG)
fn lora_cols(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  set_role(0u);
  cols_block(tid, wid.x, wid.y);
}

fn cols_block(tid: u32, wx: u32, wy: u32) {
  let n0 = (wx * WG + tid) * 4u;
  let j0 = wy * 4u;
  var acc = array<vec4<f32>, 4>();
  if (!STAGE) {
    let j = clamped_ranks(j0);
    let n = min(vec4<u32>(n0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(ndim() - 1u));
    for (var t = 0u; t < p.M; t++) {
      let vv = v_direct(t, j);
      let b = t * ndim();
      acc[0] = fma(vec4<f32>(x_at(b + n.x)), vv, acc[0]);
      acc[1] = fma(vec4<f32>(x_at(b + n.y)), vv, acc[1]);
      acc[2] = fma(vec4<f32>(x_at(b + n.z)), vv, acc[2]);
      acc[3] = fma(vec4<f32>(x_at(b + n.w)), vv, acc[3]);
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
        if (n0 + i < ndim()) { u = x_at(t * ndim() + n0 + i); }
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
  set_role(0u);
  let n0 = (wid.x * WG + tid) * 4u;
  let j0 = wid.y * 4u;
  var acc = array<vec4<f32>, 4>();
  if (!STAGE) {
    if (n0 < ndim()) {
      let j = clamped_ranks(j0);
      for (var t = 0u; t < p.M; t++) {
        let vv = v_direct(t, j);
        let u = x4[(t * ndim() + n0) / 4u];
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
    if (n0 < ndim()) {
      for (var r = 0u; r < TT && t0 + r < p.M; r++) {
        let vv = v_rows[r];
        let u = x4[((t0 + r) * ndim() + n0) / 4u];
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

// Workgroup wid of a multi-role dispatch: its role (NROLES for the grid's padding, which does
// nothing) and its block coordinates within that role's grid; sets the role for the loads and
// stores.
fn role_block(wid: vec3<u32>) -> vec3<u32> {
  let idx = wid.y * p.grid_x + wid.x;
  for (var r = 0u; r < NROLES; r++) {
    let q = p.roles[r];
    if (idx >= q.start && idx < q.start + q.count) {
      set_role(r);
      let local = idx - q.start;
      return vec3<u32>(r, local % q.gx, local / q.gx);
    }
  }
  return vec3<u32>(NROLES, 0u, 0u);
}

// g = dy·B and dB = s·dyᵀ·h in one dispatch: role 0 runs lora_rows' blocks, role 1 lora_cols'.
@compute @workgroup_size(WG)
fn lora_g_db(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = role_block(wid);
  if (b.x == 0u) { rows_block(tid, b.y, b.z); } else if (b.x == 1u) { cols_block(tid, b.y, b.z); }
}

// h = x·Aᵀ for up to three modules reading the same x, one role each.
@compute @workgroup_size(WG)
fn lora_rows_multi(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = role_block(wid);
  if (b.x < NROLES) { rows_block(tid, b.y, b.z); }
}

// dA = s·gᵀ·x for up to three modules reading the same x (U), one role each (V = its g).
@compute @workgroup_size(WG)
fn lora_cols_multi(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = role_block(wid);
  if (b.x < NROLES) { cols_block(tid, b.y, b.z); }
}

// lora_g_db for two modules (PAIR): roles 0 and 2 run lora_rows' blocks (g₁, g₂), roles 1 and 3
// lora_cols' (dB₁, dB₂).
@compute @workgroup_size(WG)
fn lora_g_db_pair(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = role_block(wid);
  if (b.x == 0u || b.x == 2u) { rows_block(tid, b.y, b.z); } else if (b.x < 4u) { cols_block(tid, b.y, b.z); }
}

// lora_g_db for up to three modules (MANY): even roles run lora_rows' blocks (g_i), odd roles
// lora_cols' (dB_i).
@compute @workgroup_size(WG)
fn lora_g_db_many(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = role_block(wid);
  if (b.x < NROLES) {
    if (b.x % 2u == 0u) { rows_block(tid, b.y, b.z); } else { cols_block(tid, b.y, b.z); }
  }
}
