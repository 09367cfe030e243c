// lora_da.wgsl: LoRA's dA = s·gᵀ·x of many modules, in one dispatch.
//
// The training backward forms each adapted module's g = dy·B when it reaches the module, but its
// dA = s·gᵀ·x needs nothing else after that: x is the module's input, which the forward saved. So
// the backward leaves every dA until it has passed a chunk of layers (all of them, usually; see
// loraDaChunks in packages/models/src/forward.ts) and forms them here in one dispatch, instead of
// one (or one per shared-input group) per module per layer. For role i:
//   dA_i (R_i×N_i at out_off_i of `out`) = alpha_i·Σ_t V_i[t]ᵀ·U_i[t] + beta·dA_i
// U_i = the module's input x (T×N_i at u_off_i of `u`), V_i = its g (T×R_i at v_off_i of `v`).
// The three bindings are arenas, bound whole: the forward's dA inputs (one per chunk of layers),
// the backward's g slots, the trainer's gradients.
//
// Work split as lora_matmul.wgsl's lora_cols: an invocation owns 4 consecutive columns n × 4
// ranks j and reduces over T. A role's workgroups are gx column blocks (4·WG columns each) times
// ⌈R/4⌉ rank blocks, laid flat from its `start`; the roles follow one another over a 2-D grid
// grid_x wide. Every workgroup finds its role by a binary search over the starts: the role, hence
// every loop bound and address, is the same for the whole workgroup, and the barriers sit in
// loops over p.T only.
//   STAGE (GPUs): the workgroup's four ranks of TT rows of V are staged in workgroup memory;
//   otherwise (CPU adapters) each invocation reads them itself, without barriers.
//   ALIGNED: every role's N and u_off are multiples of 4, so U is read as whole vec4s.

struct Role {
  R: u32,       // rank
  N: u32,       // the module's input width (columns of U and of dA)
  start: u32,   // first workgroup (flat index)
  gx: u32,      // column blocks
  u_off: u32,   // where U, V and dA start in their bindings, in elements
  v_off: u32,
  out_off: u32,
  alpha: f32,   // the module's LoRA scale s
}

struct Params {
  T: u32,       // rows (the reduced dimension)
  count: u32,   // roles in use
  grid_x: u32,  // workgroups per row of the grid
  total: u32,   // workgroups of all roles (the rest of the grid is padding)
  beta: f32,    // 1: accumulate into dA (micro-batches); 0: overwrite
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
  roles: array<Role, 256>,  // MAX_ROLES in lora_da.ts
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> u: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 64;      // invocations per workgroup
override TT: u32 = 16;      // rows of V staged per step
override STAGE: bool = true;
override ALIGNED: bool = false;

var<workgroup> v_rows: array<vec4<f32>, TT>;

// The role of workgroup idx < p.total: the last whose start ≤ idx (starts ascend from 0).
fn find_role(idx: u32) -> u32 {
  var lo = 0u;
  var hi = p.count;
  loop {
    if (hi - lo <= 1u) { break; }
    let mid = (lo + hi) / 2u;
    if (p.roles[mid].start <= idx) { lo = mid; } else { hi = mid; }
  }
  return lo;
}

// V row t at ranks j (clamped into range by the caller; zero past T).
fn v_row(r: Role, t: u32, j: vec4<u32>) -> vec4<f32> {
  if (t >= p.T) { return vec4<f32>(0.0); }
  let b = r.v_off + t * r.R;
  return vec4<f32>(v[b + j.x], v[b + j.y], v[b + j.z], v[b + j.w]);
}

// U[t][n0..n0+3], zero past N.
fn u_four(r: Role, t: u32, n0: u32) -> vec4<f32> {
  let e = r.u_off + t * r.N + n0;
  if (ALIGNED) { return u[e / 4u]; }
  var q = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (n0 + i < r.N) { q[i] = u[(e + i) / 4u][(e + i) % 4u]; }
  }
  return q;
}

@compute @workgroup_size(WG)
fn lora_da_many(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let idx = wid.y * p.grid_x + wid.x;
  if (idx >= p.total) { return; }
  let r = p.roles[find_role(idx)];
  let local = idx - r.start;
  let n0 = ((local % r.gx) * WG + tid) * 4u;
  let j0 = (local / r.gx) * 4u;
  let j = min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(r.R - 1u));
  var acc = array<vec4<f32>, 4>();  // acc[i][jj]: column n0 + i, rank j0 + jj
  for (var t0 = 0u; t0 < p.T; t0 += TT) {
    if (STAGE) {
      for (var k = tid; k < TT; k += WG) { v_rows[k] = v_row(r, t0 + k, j); }
      workgroupBarrier();
    }
    if (n0 < r.N) {
      for (var k = 0u; k < TT && t0 + k < p.T; k++) {
        var vv: vec4<f32>;
        if (STAGE) { vv = v_rows[k]; } else { vv = v_row(r, t0 + k, j); }
        let uu = u_four(r, t0 + k, n0);
        acc[0] = fma(vec4<f32>(uu.x), vv, acc[0]);
        acc[1] = fma(vec4<f32>(uu.y), vv, acc[1]);
        acc[2] = fma(vec4<f32>(uu.z), vv, acc[2]);
        acc[3] = fma(vec4<f32>(uu.w), vv, acc[3]);
      }
    }
    if (STAGE) { workgroupBarrier(); }
  }
  for (var i = 0u; i < 4u; i++) {
    let n = n0 + i;
    if (n >= r.N) { break; }
    for (var jj = 0u; jj < 4u; jj++) {
      let jr = j0 + jj;
      if (jr >= r.R) { break; }
      let o = r.out_off + jr * r.N + n;
      var y = r.alpha * acc[i][jj];
      if (p.beta != 0.0) { y += p.beta * out[o]; }
      out[o] = y;
    }
  }
}
