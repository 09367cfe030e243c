// attention.wgsl: causal self-attention with grouped key/value heads (GQA), FlashAttention-style.
//
// For batch b, query head h (kv head g = h / group, group = nH / nKV), query row i at absolute
// position pos0 + i and key j at position j (j < Tk), key j is visible to query i iff
// j ≤ pos0 + i. With scale (usually 1/√hd):
//
//   S[i,j]  = scale · q[i]·k[j]                   (visible pairs only)
//   lse[i]  = log Σ_j exp S[i,j]
//   P[i,j]  = exp(S[i,j] − lse[i])
//   o[i]    = Σ_j P[i,j] · v[j]
//
// Backward, given dout = ∂L/∂o:
//   delta[i] = Σ_d dout[i,d]·o[i,d]               (= Σ_j P[i,j]·dP[i,j])
//   dP[i,j]  = dout[i]·v[j]
//   dS[i,j]  = P[i,j] · (dP[i,j] − delta[i])
//   dq[i]    = scale · Σ_j dS[i,j] · k[j]
//   dk[j]    = scale · Σ_{h in group} Σ_i dS[i,j] · q[i]
//   dv[j]    = Σ_{h in group} Σ_i P[i,j] · dout[i]
//
// Entry points (one workgroup per tile; none ever holds a Tq×Tk score matrix):
//   attention_fwd        per (query block of BQ rows, head h, batch b): stages the Q block once,
//                        then walks the visible key blocks of BK keys (K and V staged), keeping a
//                        running max m and sum l per row (online softmax) and the output in
//                        registers. Writes o and lse.
//   attention_bwd_delta  per (64 rows, head, batch): delta = rowsum(dout ∘ o).
//   attention_bwd_dq     per (query block, head, batch): recomputes P = exp(S − lse) block by block
//                        over the visible keys; dq accumulates in registers. Writes dq.
//   attention_bwd_dkv    per (key block of BK keys, kv head g, batch): K and V staged once; loops
//                        over the group's query heads and over the query blocks that can see the
//                        block, accumulating dk and dv in registers (WebGPU has no float atomics,
//                        so one workgroup owns each dk/dv row). Writes dk and dv.
//
// Bindings, group 0 (element indices; every buffer f32):
//   attention_fwd        0 p uniform, 1 q, 2 k, 3 v (read), 4 o (written), 5 lse (written)
//   attention_bwd_delta  0 p, 1 o (read: o_saved), 2 dout (read: dout_rows), 3 delta (written)
//   attention_bwd_dq     0 p, 1 q, 2 k, 3 v, 4 dout, 5 lse, 6 delta (read), 7 dq (written)
//   attention_bwd_dkv    0 p, 1 q, 2 k, 3 v, 4 dout, 5 lse, 6 delta (read), 7 dk, 8 dv (written)
// Layouts:
//   q[b,i,h,d]  at q_offset + b·q_batch + i·q_stride + h·hd + d        (rows may be strided, e.g.
//   k[b,j,g,d]  at k_offset + b·k_batch + j·k_stride + g·hd + d         a fused [q|k|v] buffer or a
//   v[b,j,g,d]  at v_offset + b·v_batch + j·v_stride + g·hd + d         KV cache [B, maxT, nKV·hd])
//   o, dout, dq [B·Tq, nH·hd] contiguous; dk, dv [B·Tk, nKV·hd] contiguous
//   lse, delta  [B, nH, Tq]; lse is what the forward saves for the backward (with o).
// All outputs are written, never accumulated; dk/dv rows of keys nobody sees are written as 0.
//
// Work split: a tile row (a query row, or a key row in attention_bwd_dkv) belongs to TD
// invocations. For the scores they split the streamed rows (keys, or queries in dkv): each takes
// KPT of them at a time and computes whole hd-long dot products from workgroup memory as vec4
// (rows are staged zero-padded to a multiple of 4, so any hd works), reading its own row once per
// KPT streamed rows. For the products P·V, dS·K, Pᵀ·dO and dSᵀ·Q each owns the vec4 columns
// td, td + TD, ..., at most VPT of them, and accumulates them in registers.
// The host picks HD4 (16, 32 or 64: head sizes up to 64, 128, 256), TD = HD4 / VPT, and the tile
// sizes BQ, BK from the device's workgroup storage and invocation limits; hd itself is a uniform,
// so every head size up to 64 shares one set of pipelines.

struct Params {
  B: u32,
  Tq: u32,
  Tk: u32,
  pos0: u32,
  nH: u32,
  nKV: u32,
  hd: u32,
  hd4: u32,       // ceil(hd / 4)
  group: u32,     // nH / nKV
  q_stride: u32,
  q_offset: u32,
  q_batch: u32,
  k_stride: u32,
  k_offset: u32,
  k_batch: u32,
  v_stride: u32,
  v_offset: u32,
  v_batch: u32,
  scale: f32,
  _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// attention_fwd, attention_bwd_dq, attention_bwd_dkv
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
// attention_fwd
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse_out: array<f32>;
// attention_bwd_delta
@group(0) @binding(1) var<storage, read> o_saved: array<f32>;
@group(0) @binding(2) var<storage, read> dout_rows: array<f32>;
@group(0) @binding(3) var<storage, read_write> delta_out: array<f32>;
// attention_bwd_dq, attention_bwd_dkv
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> lse: array<f32>;
@group(0) @binding(6) var<storage, read> delta: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;

override HD4: u32 = 16u;  // vec4s per staged row: hd ≤ 4·HD4 (the host picks 16, 32 or 64)
override TD: u32 = 4u;    // invocations per tile row; TD·VPT ≥ HD4
override BQ: u32 = 16u;   // query rows per block
override BK: u32 = 16u;   // keys per block
override KPT: u32 = 4u;   // streamed rows per dots_* call (1..4): min(4, tile / TD)

const VPT: u32 = 4u;          // vec4 output columns per invocation (registers: VPT vec4s per output)
const MASKED: f32 = -3.0e38;  // score of an invisible key; finite so no inf arithmetic is needed
const VISIBLE: f32 = -1.0e38; // scores above this are real
const DELTA_WG: u32 = 64u;

var<workgroup> qs: array<vec4<f32>, BQ * HD4>;   // query rows (fwd, dq, dkv)
var<workgroup> dos: array<vec4<f32>, BQ * HD4>;  // dout rows (dq, dkv)
var<workgroup> ks: array<vec4<f32>, BK * HD4>;   // key rows
var<workgroup> vs: array<vec4<f32>, BK * HD4>;   // value rows
var<workgroup> ss: array<f32, BQ * BK>;          // fwd: S, dq: dS (row-major BQ×BK); dkv: Pᵀ (BK×BQ)
var<workgroup> ps: array<f32, BQ * BK>;          // dkv: dSᵀ (BK×BQ)
var<workgroup> row_lse: array<f32, BQ>;          // dkv: lse of the staged query rows
var<workgroup> row_delta: array<f32, BQ>;        // dkv: delta of the staged query rows

// ---- staging: rows of one head into workgroup memory, as vec4 zero-padded past hd -------------
// Each invocation writes whole vec4s, so no two invocations write parts of one vector.

fn q_index(b: u32, i: u32, h: u32) -> u32 {
  return p.q_offset + b * p.q_batch + i * p.q_stride + h * p.hd;
}

fn k_index(b: u32, j: u32, g: u32) -> u32 {
  return p.k_offset + b * p.k_batch + j * p.k_stride + g * p.hd;
}

fn v_index(b: u32, j: u32, g: u32) -> u32 {
  return p.v_offset + b * p.v_batch + j * p.v_stride + g * p.hd;
}

// Index of row i (of Tq), head h in the contiguous [B·Tq, nH·hd] buffers o, dout, dq.
fn out_index(b: u32, i: u32, h: u32) -> u32 {
  return ((b * p.Tq + i) * p.nH + h) * p.hd;
}

// Index of row j (of Tk), kv head g in the contiguous [B·Tk, nKV·hd] buffers dk, dv.
fn kv_out_index(b: u32, j: u32, g: u32) -> u32 {
  return ((b * p.Tk + j) * p.nKV + g) * p.hd;
}

fn row_index(b: u32, h: u32, i: u32) -> u32 {
  return (b * p.nH + h) * p.Tq + i;
}

fn stage_q(tid: u32, nthreads: u32, b: u32, h: u32, i0: u32) {
  for (var e = tid; e < BQ * p.hd4; e += nthreads) {
    let r = e / p.hd4;
    let c = e % p.hd4;
    var x = vec4<f32>(0.0);
    if (i0 + r < p.Tq) {
      let base = q_index(b, i0 + r, h) + c * 4u;
      for (var t = 0u; t < 4u; t++) {
        if (c * 4u + t < p.hd) { x[t] = q[base + t]; }
      }
    }
    qs[r * HD4 + c] = x;
  }
}

fn stage_dout(tid: u32, nthreads: u32, b: u32, h: u32, i0: u32) {
  for (var e = tid; e < BQ * p.hd4; e += nthreads) {
    let r = e / p.hd4;
    let c = e % p.hd4;
    var x = vec4<f32>(0.0);
    if (i0 + r < p.Tq) {
      let base = out_index(b, i0 + r, h) + c * 4u;
      for (var t = 0u; t < 4u; t++) {
        if (c * 4u + t < p.hd) { x[t] = dout[base + t]; }
      }
    }
    dos[r * HD4 + c] = x;
  }
}

fn stage_kv(tid: u32, nthreads: u32, b: u32, g: u32, j0: u32) {
  for (var e = tid; e < BK * p.hd4; e += nthreads) {
    let r = e / p.hd4;
    let c = e % p.hd4;
    var xk = vec4<f32>(0.0);
    var xv = vec4<f32>(0.0);
    if (j0 + r < p.Tk) {
      let kb = k_index(b, j0 + r, g) + c * 4u;
      let vb = v_index(b, j0 + r, g) + c * 4u;
      for (var t = 0u; t < 4u; t++) {
        if (c * 4u + t < p.hd) {
          xk[t] = k[kb + t];
          xv[t] = v[vb + t];
        }
      }
    }
    ks[r * HD4 + c] = xk;
    vs[r * HD4 + c] = xv;
  }
}

// Dot products of staged rows over hd, as vec4 (the zero padding adds nothing). An invocation
// takes KPT (≤ 4) rows of the streamed operand at a time, rows n, n + TD, n + 2·TD, n + 3·TD, and
// reads its own row once per KPT reads of the others. Row indices are clamped to the tile so no
// branch diverges; the caller drops results for rows past the tile. Four named accumulators
// rather than an array: the conditions on KPT are constant when the pipeline is built.

fn hsum(x: vec4<f32>) -> f32 {
  return x.x + x.y + x.z + x.w;
}

fn hsum4(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>) -> vec4<f32> {
  return vec4<f32>(hsum(a), hsum(b), hsum(c), hsum(d));
}

// Staged row offsets (in vec4s) of rows n + u·TD, u < 4, clamped to rows − 1.
fn block_rows(n: u32, rows: u32) -> vec4<u32> {
  let last = rows - 1u;
  return vec4<u32>(min(n, last), min(n + TD, last), min(n + 2u * TD, last), min(n + 3u * TD, last)) * HD4;
}

// q row r · key rows kc + u·TD.
fn dots_q_k(r: u32, kc: u32) -> vec4<f32> {
  let kb = block_rows(kc, BK);
  var a0 = vec4<f32>(0.0);
  var a1 = vec4<f32>(0.0);
  var a2 = vec4<f32>(0.0);
  var a3 = vec4<f32>(0.0);
  for (var c = 0u; c < p.hd4; c++) {
    let x = qs[r * HD4 + c];
    a0 = fma(x, ks[kb.x + c], a0);
    if (KPT > 1u) { a1 = fma(x, ks[kb.y + c], a1); }
    if (KPT > 2u) { a2 = fma(x, ks[kb.z + c], a2); }
    if (KPT > 3u) { a3 = fma(x, ks[kb.w + c], a3); }
  }
  return hsum4(a0, a1, a2, a3);
}

struct Dots {
  qk: vec4<f32>,  // q·k for the KPT pairs
  dv: vec4<f32>,  // dout·v for the same pairs
}

// attention_bwd_dq: query row r against key rows kc + u·TD.
fn dots_row_keys(r: u32, kc: u32) -> Dots {
  let kb = block_rows(kc, BK);
  var a0 = vec4<f32>(0.0);
  var a1 = vec4<f32>(0.0);
  var a2 = vec4<f32>(0.0);
  var a3 = vec4<f32>(0.0);
  var b0 = vec4<f32>(0.0);
  var b1 = vec4<f32>(0.0);
  var b2 = vec4<f32>(0.0);
  var b3 = vec4<f32>(0.0);
  for (var c = 0u; c < p.hd4; c++) {
    let x = qs[r * HD4 + c];
    let y = dos[r * HD4 + c];
    a0 = fma(x, ks[kb.x + c], a0);
    b0 = fma(y, vs[kb.x + c], b0);
    if (KPT > 1u) {
      a1 = fma(x, ks[kb.y + c], a1);
      b1 = fma(y, vs[kb.y + c], b1);
    }
    if (KPT > 2u) {
      a2 = fma(x, ks[kb.z + c], a2);
      b2 = fma(y, vs[kb.z + c], b2);
    }
    if (KPT > 3u) {
      a3 = fma(x, ks[kb.w + c], a3);
      b3 = fma(y, vs[kb.w + c], b3);
    }
  }
  return Dots(hsum4(a0, a1, a2, a3), hsum4(b0, b1, b2, b3));
}

// attention_bwd_dkv: key row kr against query rows ic + u·TD.
fn dots_key_rows(kr: u32, ic: u32) -> Dots {
  let qb = block_rows(ic, BQ);
  var a0 = vec4<f32>(0.0);
  var a1 = vec4<f32>(0.0);
  var a2 = vec4<f32>(0.0);
  var a3 = vec4<f32>(0.0);
  var b0 = vec4<f32>(0.0);
  var b1 = vec4<f32>(0.0);
  var b2 = vec4<f32>(0.0);
  var b3 = vec4<f32>(0.0);
  for (var c = 0u; c < p.hd4; c++) {
    let x = ks[kr * HD4 + c];
    let y = vs[kr * HD4 + c];
    a0 = fma(x, qs[qb.x + c], a0);
    b0 = fma(y, dos[qb.x + c], b0);
    if (KPT > 1u) {
      a1 = fma(x, qs[qb.y + c], a1);
      b1 = fma(y, dos[qb.y + c], b1);
    }
    if (KPT > 2u) {
      a2 = fma(x, qs[qb.z + c], a2);
      b2 = fma(y, dos[qb.z + c], b2);
    }
    if (KPT > 3u) {
      a3 = fma(x, qs[qb.w + c], a3);
      b3 = fma(y, dos[qb.w + c], b3);
    }
  }
  return Dots(hsum4(a0, a1, a2, a3), hsum4(b0, b1, b2, b3));
}

// Writes the invocation's columns (td + t·TD, as vec4) of one row scaled by s, stopping at hd.
fn write_row_o(base: u32, td: u32, acc: array<vec4<f32>, VPT>, s: f32) {
  for (var t = 0u; t < VPT; t++) {
    let c = td + t * TD;
    if (c < p.hd4) {
      let x = acc[t] * s;
      for (var u = 0u; u < 4u; u++) {
        if (c * 4u + u < p.hd) { o[base + c * 4u + u] = x[u]; }
      }
    }
  }
}

fn write_row_dq(base: u32, td: u32, acc: array<vec4<f32>, VPT>, s: f32) {
  for (var t = 0u; t < VPT; t++) {
    let c = td + t * TD;
    if (c < p.hd4) {
      let x = acc[t] * s;
      for (var u = 0u; u < 4u; u++) {
        if (c * 4u + u < p.hd) { dq[base + c * 4u + u] = x[u]; }
      }
    }
  }
}

fn write_row_dk(base: u32, td: u32, acc: array<vec4<f32>, VPT>, s: f32) {
  for (var t = 0u; t < VPT; t++) {
    let c = td + t * TD;
    if (c < p.hd4) {
      let x = acc[t] * s;
      for (var u = 0u; u < 4u; u++) {
        if (c * 4u + u < p.hd) { dk[base + c * 4u + u] = x[u]; }
      }
    }
  }
}

fn write_row_dv(base: u32, td: u32, acc: array<vec4<f32>, VPT>) {
  for (var t = 0u; t < VPT; t++) {
    let c = td + t * TD;
    if (c < p.hd4) {
      for (var u = 0u; u < 4u; u++) {
        if (c * 4u + u < p.hd) { dv[base + c * 4u + u] = acc[t][u]; }
      }
    }
  }
}

// Keys [0, end) can be visible to some query row of the block starting at i0.
fn key_end(i0: u32) -> u32 {
  let last = min(i0 + BQ, p.Tq) - 1u;
  return min(p.Tk, p.pos0 + last + 1u);
}

// ---- forward -------------------------------------------------------------------------------

@compute @workgroup_size(BQ * TD)
fn attention_fwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let h = wid.y;
  let g = h / p.group;
  let i0 = wid.x * BQ;
  let r = tid / TD;
  let td = tid % TD;
  let i = i0 + r;
  let row_ok = i < p.Tq;

  stage_q(tid, BQ * TD, b, h, i0);
  var acc = array<vec4<f32>, VPT>();
  var m = MASKED;  // running max of the row's scores
  var l = 0.0;     // running Σ exp(S − m)
  let end = key_end(i0);
  for (var j0 = 0u; j0 < end; j0 += BK) {
    stage_kv(tid, BQ * TD, b, g, j0);
    workgroupBarrier();
    for (var kc = td; kc < BK; kc += KPT * TD) {
      let dots = dots_q_k(r, kc);
      for (var u = 0u; u < KPT; u++) {
        let kk = kc + u * TD;
        let j = j0 + kk;
        if (kk < BK) {
          var s = MASKED;
          if (row_ok && j < p.Tk && j <= p.pos0 + i) { s = p.scale * dots[u]; }
          ss[r * BK + kk] = s;
        }
      }
    }
    workgroupBarrier();
    // Every invocation of the row reads the whole score row: no extra barrier for the max.
    var mb = MASKED;
    for (var kk = 0u; kk < BK; kk++) { mb = max(mb, ss[r * BK + kk]); }
    let m_new = max(m, mb);
    let alpha = exp(m - m_new);
    l *= alpha;
    for (var t = 0u; t < VPT; t++) { acc[t] *= alpha; }
    for (var kk = 0u; kk < BK; kk++) {
      let s = ss[r * BK + kk];
      if (s > VISIBLE) {
        let pr = exp(s - m_new);
        l += pr;
        for (var t = 0u; t < VPT; t++) {
          let c = td + t * TD;
          if (c < p.hd4) { acc[t] = fma(vec4<f32>(pr), vs[kk * HD4 + c], acc[t]); }
        }
      }
    }
    m = m_new;
    workgroupBarrier();
  }
  if (row_ok) {
    // Key 0 is visible to every row, so l ≥ 1 here.
    write_row_o(out_index(b, i, h), td, acc, 1.0 / l);
    if (td == 0u) { lse_out[row_index(b, h, i)] = m + log(l); }
  }
}

// ---- backward ------------------------------------------------------------------------------

@compute @workgroup_size(DELTA_WG)
fn attention_bwd_delta(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let i = gid.x;
  let h = wid.y;
  let b = wid.z;
  if (i >= p.Tq) { return; }
  let base = out_index(b, i, h);
  var acc = 0.0;
  for (var d = 0u; d < p.hd; d++) { acc = fma(o_saved[base + d], dout_rows[base + d], acc); }
  delta_out[row_index(b, h, i)] = acc;
}

@compute @workgroup_size(BQ * TD)
fn attention_bwd_dq(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let h = wid.y;
  let g = h / p.group;
  let i0 = wid.x * BQ;
  let r = tid / TD;
  let td = tid % TD;
  let i = i0 + r;
  let row_ok = i < p.Tq;

  stage_q(tid, BQ * TD, b, h, i0);
  stage_dout(tid, BQ * TD, b, h, i0);
  var lse_i = 0.0;
  var delta_i = 0.0;
  if (row_ok) {
    lse_i = lse[row_index(b, h, i)];
    delta_i = delta[row_index(b, h, i)];
  }
  var acc = array<vec4<f32>, VPT>();
  let end = key_end(i0);
  for (var j0 = 0u; j0 < end; j0 += BK) {
    stage_kv(tid, BQ * TD, b, g, j0);
    workgroupBarrier();
    for (var kc = td; kc < BK; kc += KPT * TD) {
      let dots = dots_row_keys(r, kc);
      for (var u = 0u; u < KPT; u++) {
        let kk = kc + u * TD;
        let j = j0 + kk;
        if (kk < BK) {
          var ds = 0.0;
          if (row_ok && j < p.Tk && j <= p.pos0 + i) {
            let pr = exp(p.scale * dots.qk[u] - lse_i);
            ds = pr * (dots.dv[u] - delta_i);
          }
          ss[r * BK + kk] = ds;
        }
      }
    }
    workgroupBarrier();
    for (var kk = 0u; kk < BK; kk++) {
      let ds = vec4<f32>(ss[r * BK + kk]);
      for (var t = 0u; t < VPT; t++) {
        let c = td + t * TD;
        if (c < p.hd4) { acc[t] = fma(ds, ks[kk * HD4 + c], acc[t]); }
      }
    }
    workgroupBarrier();
  }
  if (row_ok) { write_row_dq(out_index(b, i, h), td, acc, p.scale); }
}

@compute @workgroup_size(BK * TD)
fn attention_bwd_dkv(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let g = wid.y;
  let j0 = wid.x * BK;
  let kr = tid / TD;
  let td = tid % TD;
  let j = j0 + kr;
  let key_ok = j < p.Tk;

  stage_kv(tid, BK * TD, b, g, j0);
  var acc_k = array<vec4<f32>, VPT>();
  var acc_v = array<vec4<f32>, VPT>();
  // Query i sees key j0 iff i ≥ j0 − pos0: earlier query rows see nothing of this block.
  var i_start = 0u;
  if (j0 > p.pos0) { i_start = j0 - p.pos0; }
  for (var hh = 0u; hh < p.group; hh++) {
    let h = g * p.group + hh;
    for (var i0 = i_start; i0 < p.Tq; i0 += BQ) {
      workgroupBarrier();  // the previous block's readers are done (and K, V are staged)
      stage_q(tid, BK * TD, b, h, i0);
      stage_dout(tid, BK * TD, b, h, i0);
      for (var e = tid; e < BQ; e += BK * TD) {
        var x = 0.0;
        var y = 0.0;
        if (i0 + e < p.Tq) {
          x = lse[row_index(b, h, i0 + e)];
          y = delta[row_index(b, h, i0 + e)];
        }
        row_lse[e] = x;
        row_delta[e] = y;
      }
      workgroupBarrier();
      for (var ic = td; ic < BQ; ic += KPT * TD) {
        let dots = dots_key_rows(kr, ic);
        for (var u = 0u; u < KPT; u++) {
          let ii = ic + u * TD;
          let i = i0 + ii;
          if (ii < BQ) {
            var pr = 0.0;
            var ds = 0.0;
            if (key_ok && i < p.Tq && j <= p.pos0 + i) {
              pr = exp(p.scale * dots.qk[u] - row_lse[ii]);
              ds = pr * (dots.dv[u] - row_delta[ii]);
            }
            ss[kr * BQ + ii] = pr;
            ps[kr * BQ + ii] = ds;
          }
        }
      }
      workgroupBarrier();
      for (var ii = 0u; ii < BQ; ii++) {
        let pr = vec4<f32>(ss[kr * BQ + ii]);
        let ds = vec4<f32>(ps[kr * BQ + ii]);
        for (var t = 0u; t < VPT; t++) {
          let c = td + t * TD;
          if (c < p.hd4) {
            acc_v[t] = fma(pr, dos[ii * HD4 + c], acc_v[t]);
            acc_k[t] = fma(ds, qs[ii * HD4 + c], acc_k[t]);
          }
        }
      }
    }
  }
  if (key_ok) {
    let base = kv_out_index(b, j, g);
    write_row_dk(base, td, acc_k, p.scale);
    write_row_dv(base, td, acc_v);
  }
}
