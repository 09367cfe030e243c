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
// Two sets of entry points compute the same results; the host picks one per adapter (none ever
// holds a Tq×Tk score matrix):
//
// Tiled (GPUs): one workgroup per tile, blocks of rows staged in workgroup memory.
//   attention_fwd        per (query block of OWN rows, head h, batch b): stages the Q block once,
//                        then walks the visible key blocks of STR keys (K and V staged), keeping a
//                        running max m and sum l per row (online softmax) and the output in
//                        registers. Writes o and lse.
//   attention_bwd_dq     per (query block, head, batch): recomputes P = exp(S − lse) block by block
//                        over the visible keys; dq accumulates in registers. Writes dq.
//   attention_bwd_dkv    per (key block of OWN keys, kv head g, batch): K and V staged once; loops
//                        over the group's query heads and over the query blocks (STR rows) that
//                        can see the block, accumulating dk and dv in registers (WebGPU has no float
//                        atomics, so one workgroup owns each dk/dv row). Writes dk and dv.
//   attention_bwd        both in one dispatch: the workgroups of attention_bwd_dkv (kv heads) and
//                        of attention_bwd_dq (query heads) side by side along y, each computing the
//                        delta it needs from o; dq, dk and dv are places of one buffer.
// Rows (CPU-backed adapters): one invocation per query row (per key row in dkv), WG
// invocations per workgroup, no workgroup memory and no barrier. The invocation keeps its own
// row(s) and accumulators in private arrays and reads the rows it streams straight from the
// storage buffers, four at a time: the same online softmax (fwd), the same recomputation of P and
// dS (dq, dkv), the same outputs.
//   attention_fwd_rows, attention_bwd_dq_rows, attention_bwd_dkv_rows
// Shared:
//   attention_bwd_delta  per (64 rows, head, batch): delta = rowsum(dout ∘ o).
//
// Why a second set: on a CPU driver (SwiftShader; llvmpipe works alike) the invocations of a
// workgroup are SIMD lanes, four at a time, and a workgroup that touches workgroup memory or a
// barrier runs each group of four as a coroutine switched at every barrier (the
// zero-initialisation of workgroup memory that WebGPU requires adds one barrier by itself).
// Measured on SwiftShader under Node: about 10 µs per four invocations to start such a workgroup
// plus about 1 µs per barrier, and workgroup memory is ordinary RAM, so staging saves nothing; a
// kernel with neither costs next to nothing per invocation. The tiled kernels keep what real GPUs
// need (tiles staged in workgroup memory, reused by every row of the block).
//
// Bindings, group 0 (element indices; every buffer f32):
//   attention_fwd(_rows)      0 p uniform, 1 q, 2 k, 3 v (read), 4 o (written), 5 lse (written)
//   attention_bwd_delta       0 p, 1 o (read: o_saved), 2 dout (read: dout_rows), 3 delta (written)
//   attention_bwd_dq(_rows)   0 p, 1 q, 2 k, 3 v, 4 dout, 5 lse, 6 delta (read), 7 dq (written),
//                             8 delta_w (written when DELTA_FROM_O: then binding 6 holds o and the
//                             kernel computes delta itself, exactly as attention_bwd_delta does,
//                             and writes it for attention_bwd_dkv; one dispatch fewer)
//   attention_bwd_dkv(_rows)  0 p, 1 q, 2 k, 3 v, 4 dout, 5 lse, 6 delta (read), 7 dk, 8 dv (written)
//   attention_bwd             0 p, 1 q, 2 k, 3 v, 4 dout, 5 lse, 6 o (read; DELTA_FROM_O), 7 grads
//                             (written: dq at element dq_off, dk at dk_off, dv at dv_off)
// Layouts:
//   q[b,i,h,d]  at q_offset + b·q_batch + i·q_stride + h·hd + d        (rows may be strided, e.g.
//   k[b,j,g,d]  at k_offset + b·k_batch + j·k_stride + g·hd + d         a fused [q|k|v] buffer or a
//   v[b,j,g,d]  at v_offset + b·v_batch + j·v_stride + g·hd + d         KV cache [B, maxT, nKV·hd])
//   o, dout, dq [B·Tq, nH·hd] contiguous; dk, dv [B·Tk, nKV·hd] contiguous (each at its offset
//               in grads for attention_bwd)
//   lse, delta  [B, nH, Tq]; lse is what the forward saves for the backward (with o).
// All outputs are written, never accumulated; dk/dv rows of keys nobody sees are written as 0.
//
// Work split of the tiled kernels: a tile row (a query row, or a key row in attention_bwd_dkv)
// belongs to TD invocations. For the scores they split the streamed rows (keys, or queries in
// dkv): each takes KPT of them at a time and computes whole hd-long dot products from workgroup
// memory as vec4, reading its own row once per KPT streamed rows. For the products P·V, dS·K,
// Pᵀ·dO and dSᵀ·Q each owns the vec4 columns td, td + TD, ..., at most VPT of them, and
// accumulates them in registers.
// The head size HD is a pipeline constant, so every loop over a row has a constant trip count
// (HD4 = ⌈HD/4⌉ vec4s, the last zero-padded when HD % 4 ≠ 0) and the edge tests fold away. The
// host picks TD = ⌈HD4 / VPT⌉ and the tile sizes OWN, STR from the device's workgroup storage and
// invocation limits. The uniforms hd and hd4 must equal HD and HD4.

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
  rope_scaling: f32,  // ROPE: HF's attention_scaling (cos and sin are multiplied by it)
  dq_off: u32,        // attention_bwd: where dq, dk and dv start in grads (elements)
  dk_off: u32,
  dv_off: u32,
  pad0: u32,
  // ROPE: RoPE's inverse frequencies inv_freq[0..HD/2), four to a vector (the rest zero).
  inv_freq: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> p: Params;
// attention_fwd and the backward's dq and dkv kernels
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
// the backward's dq and dkv kernels
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> lse: array<f32>;
@group(0) @binding(6) var<storage, read> delta: array<f32>;   // o with DELTA_FROM_O
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;
@group(0) @binding(8) var<storage, read_write> delta_w: array<f32>;  // attention_bwd_dq(_rows)
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;
@group(0) @binding(7) var<storage, read_write> grads: array<f32>;  // attention_bwd

override HD: u32 = 64u;              // head size (1..256)
override HD4: u32 = (HD + 3u) / 4u;  // vec4s per row; follows HD, never set by the host
override TD: u32 = 4u;    // tiled: invocations per tile row; TD·VPT ≥ HD4
override OWN: u32 = 16u;  // tiled: rows a workgroup owns (query rows in fwd and dq, keys in dkv)
override STR: u32 = 16u;  // tiled: rows streamed per block (keys in fwd and dq, query rows in dkv)
override KPT: u32 = 4u;   // tiled: streamed rows per dots_* call (1..4): min(4, STR / TD)
override WG: u32 = 64u;   // rows kernels: invocations (rows) per workgroup
// attention_bwd_dq(_rows), attention_bwd_dkv, attention_bwd: binding 6 holds o, and the kernel
// computes delta itself (row_delta); attention_bwd_dq(_rows) then writes it to binding 8.
override DELTA_FROM_O: bool = false;
// The backward kernels: q and k were rotated by RoPE (query row i at position pos0 + i, key j at
// j); dq and dk are stored as the gradients of the rows before the rotation, RoPE's backward
// applied here instead of in a dispatch of its own. HD % 8 == 0.
override ROPE: bool = false;
// Each value of q, k and v is rounded to f16 as it is read (as_staged: in f32 arithmetic, so no
// shader-f16 is needed): in the f16 build's forward, and in the backward kernels of such a
// forward (f32 builds, or the tiled kernels' f16 build under a loss scale), so that the scores and probabilities they recompute are the ones whose lse the
// forward saved, and the gradients are those of the function the forward computed. Every kernel
// reads them through q4, k4 and v4.
override ROUND_F16: bool = false;

const VPT: u32 = 4u;          // vec4 output columns per invocation (registers: VPT vec4s per output)
const MASKED: f32 = -3.0e38;  // score of an invisible key; finite so no inf arithmetic is needed
const VISIBLE: f32 = -1.0e38; // scores above this are real
const DELTA_WG: u32 = 64u;
const RMAX: u32 = 64u;        // rows kernels: vec4s in a private row array (HD ≤ 256)

// The staged rows hold tile_t: f32 (tile_f32.wgsl), or f16 (tile_f16.wgsl) for the forward on
// adapters with shader-f16 (the backward of such a forward reads them rounded: ROUND_F16) and for
// the tiled backward of such a forward under a loss scale (dout staged in f16, its small values
// lifted by the scale), and tile_fma / tile_scale_fma form the products from them (in f32 in both
// builds). A workgroup owns OWN rows (own_a, and own_b in the backward) and streams
// blocks of STR rows (str_a, str_b) past them; which tensor each holds depends on the kernel:
//                 own_a   own_b   str_a   str_b
//   fwd           q       -       k       v
//   dq            q       dout    k       v
//   dkv           k       v       q       dout
// so the backward's two kernels share every function past staging (dots2_own_str: q·k and dout·v
// either way round).
var<workgroup> own_a: array<vec4<tile_t>, OWN * HD4>;
var<workgroup> own_b: array<vec4<tile_t>, OWN * HD4>;
var<workgroup> str_a: array<vec4<tile_t>, STR * HD4>;
var<workgroup> str_b: array<vec4<tile_t>, STR * HD4>;
var<workgroup> ss: array<f32, OWN * STR>;     // fwd: S, dq: dS, dkv: P (row-major, own row × streamed row)
var<workgroup> ps: array<f32, OWN * STR>;     // dkv: dS
var<workgroup> str_lse: array<f32, STR>;      // dkv: lse of the streamed query rows
var<workgroup> str_delta: array<f32, STR>;    // dkv: delta of the streamed query rows

// ---- rows of one head: indices, vec4 loads and stores ----------------------------------------

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

// Whether vec4 c of a row lies wholly inside the head: a constant unless HD % 4 ≠ 0, and then
// false only for the last one, whose missing lanes load as 0 and are not stored.
fn full4(c: u32) -> bool {
  return HD % 4u == 0u || c * 4u + 4u <= HD;
}

// x as the f16 build stages it (ROUND_F16): rounded to the nearest f16, ties to even; else x. The
// f16 build's forward rounds so too before it converts to f16 (then exact), so forward and
// backward see the same values whatever rounding a device's conversion uses. By its bits rather
// than pack2x16float, whose rounding WGSL leaves to the implementation (Mesa's lavapipe does not
// round to nearest). Values past f16's range are not stageable in the first place.
fn as_staged(x: vec4<f32>) -> vec4<f32> {
  if (!ROUND_F16) { return x; }
  // Normal f16 magnitudes: keep 10 of f32's 23 mantissa bits; a carry runs into the exponent.
  let b = bitcast<vec4<u32>>(x);
  let even = (b >> vec4<u32>(13u)) & vec4<u32>(1u);
  let normal = bitcast<vec4<f32>>((b + vec4<u32>(0xfffu) + even) & vec4<u32>(0xffffe000u));
  // Below 2^-14, f16's subnormals: multiples of 2^-24 (round() takes ties to even).
  let subnormal = round(x * 16777216.0) / 16777216.0;
  return select(normal, subnormal, abs(x) < vec4<f32>(6.103515625e-5));
}

// vec4 c of the row starting at element base (rows need not be 16-byte aligned: scalar loads).
fn q4(base: u32, c: u32) -> vec4<f32> {
  let e = base + c * 4u;
  if (full4(c)) { return as_staged(vec4<f32>(q[e], q[e + 1u], q[e + 2u], q[e + 3u])); }
  var x = vec4<f32>(0.0);
  for (var t = 0u; t < HD % 4u; t++) { x[t] = q[e + t]; }
  return as_staged(x);
}

fn k4(base: u32, c: u32) -> vec4<f32> {
  let e = base + c * 4u;
  if (full4(c)) { return as_staged(vec4<f32>(k[e], k[e + 1u], k[e + 2u], k[e + 3u])); }
  var x = vec4<f32>(0.0);
  for (var t = 0u; t < HD % 4u; t++) { x[t] = k[e + t]; }
  return as_staged(x);
}

fn v4(base: u32, c: u32) -> vec4<f32> {
  let e = base + c * 4u;
  if (full4(c)) { return as_staged(vec4<f32>(v[e], v[e + 1u], v[e + 2u], v[e + 3u])); }
  var x = vec4<f32>(0.0);
  for (var t = 0u; t < HD % 4u; t++) { x[t] = v[e + t]; }
  return as_staged(x);
}

fn do4(base: u32, c: u32) -> vec4<f32> {
  let e = base + c * 4u;
  if (full4(c)) { return vec4<f32>(dout[e], dout[e + 1u], dout[e + 2u], dout[e + 3u]); }
  var x = vec4<f32>(0.0);
  for (var t = 0u; t < HD % 4u; t++) { x[t] = dout[e + t]; }
  return x;
}

fn put_o(base: u32, c: u32, x: vec4<f32>) {
  for (var t = 0u; t < 4u; t++) {
    if (full4(c) || c * 4u + t < HD) { o[base + c * 4u + t] = x[t]; }
  }
}

fn put_dq(base: u32, c: u32, x: vec4<f32>) {
  for (var t = 0u; t < 4u; t++) {
    if (full4(c) || c * 4u + t < HD) { dq[base + c * 4u + t] = x[t]; }
  }
}

fn put_dk(base: u32, c: u32, x: vec4<f32>) {
  for (var t = 0u; t < 4u; t++) {
    if (full4(c) || c * 4u + t < HD) { dk[base + c * 4u + t] = x[t]; }
  }
}

fn put_dv(base: u32, c: u32, x: vec4<f32>) {
  for (var t = 0u; t < 4u; t++) {
    if (full4(c) || c * 4u + t < HD) { dv[base + c * 4u + t] = x[t]; }
  }
}

fn put_grad(base: u32, c: u32, x: vec4<f32>) {
  for (var t = 0u; t < 4u; t++) {
    if (full4(c) || c * 4u + t < HD) { grads[base + c * 4u + t] = x[t]; }
  }
}

// delta of query row i: read (binding 6), or with DELTA_FROM_O summed from o (binding 6) and dout
// in attention_bwd_delta's order, so every kernel that forms it gets the same value to the bit.
fn row_delta(b: u32, h: u32, i: u32) -> f32 {
  if (DELTA_FROM_O) {
    let base = out_index(b, i, h);
    var acc = 0.0;
    for (var d = 0u; d < p.hd; d++) { acc = fma(delta[base + d], dout[base + d], acc); }
    return acc;
  }
  return delta[row_index(b, h, i)];
}

// ---- tiled kernels: staging into workgroup memory -------------------------------------------
// Each invocation writes whole vec4s, so no two invocations write parts of one vector. Rows past
// the end (Tq for q and dout, Tk for k and v) stage as 0.

fn stage_own_q(tid: u32, b: u32, h: u32, i0: u32) {
  for (var e = tid; e < OWN * HD4; e += OWN * TD) {
    let r = e / HD4;
    var x = vec4<f32>(0.0);
    if (i0 + r < p.Tq) { x = q4(q_index(b, i0 + r, h), e % HD4); }
    own_a[e] = vec4<tile_t>(x);
  }
}

fn stage_own_dout(tid: u32, b: u32, h: u32, i0: u32) {
  for (var e = tid; e < OWN * HD4; e += OWN * TD) {
    let r = e / HD4;
    var x = vec4<f32>(0.0);
    if (i0 + r < p.Tq) { x = do4(out_index(b, i0 + r, h), e % HD4); }
    own_b[e] = vec4<tile_t>(x);
  }
}

fn stage_own_kv(tid: u32, b: u32, g: u32, j0: u32) {
  for (var e = tid; e < OWN * HD4; e += OWN * TD) {
    let r = e / HD4;
    var xk = vec4<f32>(0.0);
    var xv = vec4<f32>(0.0);
    if (j0 + r < p.Tk) {
      xk = k4(k_index(b, j0 + r, g), e % HD4);
      xv = v4(v_index(b, j0 + r, g), e % HD4);
    }
    own_a[e] = vec4<tile_t>(xk);
    own_b[e] = vec4<tile_t>(xv);
  }
}

fn stage_str_kv(tid: u32, b: u32, g: u32, j0: u32) {
  for (var e = tid; e < STR * HD4; e += OWN * TD) {
    let r = e / HD4;
    var xk = vec4<f32>(0.0);
    var xv = vec4<f32>(0.0);
    if (j0 + r < p.Tk) {
      xk = k4(k_index(b, j0 + r, g), e % HD4);
      xv = v4(v_index(b, j0 + r, g), e % HD4);
    }
    str_a[e] = vec4<tile_t>(xk);
    str_b[e] = vec4<tile_t>(xv);
  }
}

fn stage_str_q_dout(tid: u32, b: u32, h: u32, i0: u32) {
  for (var e = tid; e < STR * HD4; e += OWN * TD) {
    let r = e / HD4;
    var xq = vec4<f32>(0.0);
    var xd = vec4<f32>(0.0);
    if (i0 + r < p.Tq) {
      xq = q4(q_index(b, i0 + r, h), e % HD4);
      xd = do4(out_index(b, i0 + r, h), e % HD4);
    }
    str_a[e] = vec4<tile_t>(xq);
    str_b[e] = vec4<tile_t>(xd);
  }
}

// Dot products of staged rows over hd, as vec4 (the zero padding adds nothing). An invocation
// takes KPT (≤ 4) streamed rows at a time, rows n, n + TD, n + 2·TD, n + 3·TD, and reads its own
// row once per KPT reads of the others. Row indices are clamped to the block so no branch
// diverges; the caller drops results for rows past it. Four named accumulators rather than an
// array: the conditions on KPT are constant when the pipeline is built.

fn hsum(x: vec4<f32>) -> f32 {
  return x.x + x.y + x.z + x.w;
}

fn hsum4(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>) -> vec4<f32> {
  return vec4<f32>(hsum(a), hsum(b), hsum(c), hsum(d));
}

// Staged offsets (in vec4s) of streamed rows n + u·TD, u < 4, clamped to STR − 1.
fn block_rows(n: u32) -> vec4<u32> {
  let last = STR - 1u;
  return vec4<u32>(min(n, last), min(n + TD, last), min(n + 2u * TD, last), min(n + 3u * TD, last)) * HD4;
}

// The forward's scores: own_a row r · str_a rows sc + u·TD (q·k).
fn dots_own_str(r: u32, sc: u32) -> vec4<f32> {
  let sb = block_rows(sc);
  var a0 = vec4<f32>(0.0);
  var a1 = vec4<f32>(0.0);
  var a2 = vec4<f32>(0.0);
  var a3 = vec4<f32>(0.0);
  for (var c = 0u; c < HD4; c++) {
    let x = own_a[r * HD4 + c];
    a0 = tile_fma(x, str_a[sb.x + c], a0);
    if (KPT > 1u) { a1 = tile_fma(x, str_a[sb.y + c], a1); }
    if (KPT > 2u) { a2 = tile_fma(x, str_a[sb.z + c], a2); }
    if (KPT > 3u) { a3 = tile_fma(x, str_a[sb.w + c], a3); }
  }
  return hsum4(a0, a1, a2, a3);
}

struct Dots {
  qk: vec4<f32>,  // own_a · str_a: q·k for the KPT pairs
  dv: vec4<f32>,  // own_b · str_b: dout·v for the same pairs
}

// The backward's: own row r against streamed rows sc + u·TD.
fn dots2_own_str(r: u32, sc: u32) -> Dots {
  let sb = block_rows(sc);
  var a0 = vec4<f32>(0.0);
  var a1 = vec4<f32>(0.0);
  var a2 = vec4<f32>(0.0);
  var a3 = vec4<f32>(0.0);
  var b0 = vec4<f32>(0.0);
  var b1 = vec4<f32>(0.0);
  var b2 = vec4<f32>(0.0);
  var b3 = vec4<f32>(0.0);
  for (var c = 0u; c < HD4; c++) {
    let x = own_a[r * HD4 + c];
    let y = own_b[r * HD4 + c];
    a0 = tile_fma(x, str_a[sb.x + c], a0);
    b0 = tile_fma(y, str_b[sb.x + c], b0);
    if (KPT > 1u) {
      a1 = tile_fma(x, str_a[sb.y + c], a1);
      b1 = tile_fma(y, str_b[sb.y + c], b1);
    }
    if (KPT > 2u) {
      a2 = tile_fma(x, str_a[sb.z + c], a2);
      b2 = tile_fma(y, str_b[sb.z + c], b2);
    }
    if (KPT > 3u) {
      a3 = tile_fma(x, str_a[sb.w + c], a3);
      b3 = tile_fma(y, str_b[sb.w + c], b3);
    }
  }
  return Dots(hsum4(a0, a1, a2, a3), hsum4(b0, b1, b2, b3));
}

// Keys [0, end) can be visible to some query row of the block starting at i0.
fn key_end(i0: u32) -> u32 {
  let last = min(i0 + OWN, p.Tq) - 1u;
  return min(p.Tk, p.pos0 + last + 1u);
}

// RoPE's backward (rotate_half convention; see shaders/rope.wgsl) of vec4 column c of a gradient
// row at position pos: `own` is column c of the gradient with respect to the rotated row,
// `partner` the column half a head away. cos_sin comes from shaders/rope_math.wgsl.
fn rope_grad4(own: vec4<f32>, partner: vec4<f32>, c: u32, pos: u32) -> vec4<f32> {
  let half4 = HD4 / 2u;
  let lo = c < half4;
  let f = p.inv_freq[select(c - half4, c, lo)];
  var out = vec4<f32>(0.0);
  for (var t = 0u; t < 4u; t++) {
    let cs = cos_sin(f32(pos) * f[t]) * p.rope_scaling;
    if (lo) {
      out[t] = own[t] * cs.x + partner[t] * cs.y;
    } else {
      out[t] = own[t] * cs.x - partner[t] * cs.y;
    }
  }
  return out;
}

// The column half a head away from c.
fn rope_partner(c: u32) -> u32 {
  return (c + HD4 / 2u) % HD4;
}

// The invocation's columns (td + t·TD, as vec4) of own row r of dq or dk, from its accumulators:
// scaled, and with ROPE taken back to the row before the rotation (at position pos). A column's
// partner belongs to another invocation of the row, so they are exchanged through own_a, which
// nothing reads any more. Every invocation of the workgroup calls it.
fn scaled_grad(r: u32, td: u32, acc: array<vec4<f32>, VPT>, pos: u32) -> array<vec4<f32>, VPT> {
  var out = array<vec4<f32>, VPT>();
  if (ROPE) {
    workgroupBarrier();
    for (var t = 0u; t < VPT; t++) {
      let c = td + t * TD;
      if (c < HD4) { own_a[r * HD4 + c] = vec4<tile_t>(acc[t] * p.scale); }
    }
    workgroupBarrier();
    for (var t = 0u; t < VPT; t++) {
      let c = td + t * TD;
      if (c < HD4) { out[t] = rope_grad4(vec4<f32>(own_a[r * HD4 + c]), vec4<f32>(own_a[r * HD4 + rope_partner(c)]), c, pos); }
    }
  } else {
    for (var t = 0u; t < VPT; t++) { out[t] = acc[t] * p.scale; }
  }
  return out;
}

// ---- tiled forward -------------------------------------------------------------------------------

@compute @workgroup_size(OWN * TD)
fn attention_fwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let h = wid.y;
  let g = h / p.group;
  let i0 = wid.x * OWN;
  let r = tid / TD;
  let td = tid % TD;
  let i = i0 + r;
  let row_ok = i < p.Tq;

  stage_own_q(tid, b, h, i0);
  var acc = array<vec4<f32>, VPT>();
  var m = MASKED;  // running max of the row's scores
  var l = 0.0;     // running Σ exp(S − m)
  let end = key_end(i0);
  for (var j0 = 0u; j0 < end; j0 += STR) {
    stage_str_kv(tid, b, g, j0);
    workgroupBarrier();
    for (var kc = td; kc < STR; kc += KPT * TD) {
      let dots = dots_own_str(r, kc);
      for (var u = 0u; u < KPT; u++) {
        let kk = kc + u * TD;
        let j = j0 + kk;
        if (kk < STR) {
          var s = MASKED;
          if (row_ok && j < p.Tk && j <= p.pos0 + i) { s = p.scale * dots[u]; }
          ss[r * STR + kk] = s;
        }
      }
    }
    workgroupBarrier();
    // Every invocation of the row reads the whole score row: no extra barrier for the max.
    var mb = MASKED;
    for (var kk = 0u; kk < STR; kk++) { mb = max(mb, ss[r * STR + kk]); }
    let m_new = max(m, mb);
    let alpha = exp(m - m_new);
    l *= alpha;
    for (var t = 0u; t < VPT; t++) { acc[t] *= alpha; }
    for (var kk = 0u; kk < STR; kk++) {
      let s = ss[r * STR + kk];
      if (s > VISIBLE) {
        let pr = exp(s - m_new);
        l += pr;
        for (var t = 0u; t < VPT; t++) {
          let c = td + t * TD;
          if (c < HD4) { acc[t] = tile_scale_fma(pr, str_b[kk * HD4 + c], acc[t]); }
        }
      }
    }
    m = m_new;
    workgroupBarrier();
  }
  if (row_ok) {
    // Key 0 is visible to every row, so l ≥ 1 here.
    let base = out_index(b, i, h);
    let inv = 1.0 / l;
    for (var t = 0u; t < VPT; t++) {
      let c = td + t * TD;
      if (c < HD4) { put_o(base, c, acc[t] * inv); }
    }
    if (td == 0u) { lse_out[row_index(b, h, i)] = m + log(l); }
  }
}

// ---- backward: delta (shared), the tiled dq and dk/dv, and both in one dispatch ---------------

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

// What a workgroup of the dq kernels computes for query block i0 of head h, batch b: the
// invocation's columns of its row of dq (to store as they are), and the row's delta.
struct DqTile {
  dq: array<vec4<f32>, VPT>,
  delta: f32,
}

fn dq_tile(tid: u32, b: u32, h: u32, i0: u32) -> DqTile {
  let g = h / p.group;
  let r = tid / TD;
  let td = tid % TD;
  let i = i0 + r;
  let row_ok = i < p.Tq;

  stage_own_q(tid, b, h, i0);
  stage_own_dout(tid, b, h, i0);
  var lse_i = 0.0;
  var delta_i = 0.0;
  if (row_ok) {
    lse_i = lse[row_index(b, h, i)];
    delta_i = row_delta(b, h, i);
  }
  var acc = array<vec4<f32>, VPT>();
  let end = key_end(i0);
  for (var j0 = 0u; j0 < end; j0 += STR) {
    stage_str_kv(tid, b, g, j0);
    workgroupBarrier();
    for (var kc = td; kc < STR; kc += KPT * TD) {
      let dots = dots2_own_str(r, kc);
      for (var u = 0u; u < KPT; u++) {
        let kk = kc + u * TD;
        let j = j0 + kk;
        if (kk < STR) {
          var ds = 0.0;
          if (row_ok && j < p.Tk && j <= p.pos0 + i) {
            let pr = exp(p.scale * dots.qk[u] - lse_i);
            ds = pr * (dots.dv[u] - delta_i);
          }
          ss[r * STR + kk] = ds;
        }
      }
    }
    workgroupBarrier();
    for (var kk = 0u; kk < STR; kk++) {
      let ds = ss[r * STR + kk];
      for (var t = 0u; t < VPT; t++) {
        let c = td + t * TD;
        if (c < HD4) { acc[t] = tile_scale_fma(ds, str_a[kk * HD4 + c], acc[t]); }
      }
    }
    workgroupBarrier();
  }
  return DqTile(scaled_grad(r, td, acc, p.pos0 + i), delta_i);
}

// What a workgroup of the dkv kernels computes for key block j0 of kv head g, batch b: the
// invocation's columns of its key row of dk and dv.
struct DkvTile {
  dk: array<vec4<f32>, VPT>,
  dv: array<vec4<f32>, VPT>,
}

fn dkv_tile(tid: u32, b: u32, g: u32, j0: u32) -> DkvTile {
  let kr = tid / TD;
  let td = tid % TD;
  let j = j0 + kr;
  let key_ok = j < p.Tk;

  stage_own_kv(tid, b, g, j0);
  var acc_k = array<vec4<f32>, VPT>();
  var acc_v = array<vec4<f32>, VPT>();
  // Query i sees key j0 iff i ≥ j0 − pos0: earlier query rows see nothing of this block.
  var i_start = 0u;
  if (j0 > p.pos0) { i_start = j0 - p.pos0; }
  for (var hh = 0u; hh < p.group; hh++) {
    let h = g * p.group + hh;
    for (var i0 = i_start; i0 < p.Tq; i0 += STR) {
      workgroupBarrier();  // the previous block's readers are done (and K, V are staged)
      stage_str_q_dout(tid, b, h, i0);
      for (var e = tid; e < STR; e += OWN * TD) {
        var x = 0.0;
        var y = 0.0;
        if (i0 + e < p.Tq) {
          x = lse[row_index(b, h, i0 + e)];
          y = row_delta(b, h, i0 + e);
        }
        str_lse[e] = x;
        str_delta[e] = y;
      }
      workgroupBarrier();
      for (var ic = td; ic < STR; ic += KPT * TD) {
        let dots = dots2_own_str(kr, ic);
        for (var u = 0u; u < KPT; u++) {
          let ii = ic + u * TD;
          let i = i0 + ii;
          if (ii < STR) {
            var pr = 0.0;
            var ds = 0.0;
            if (key_ok && i < p.Tq && j <= p.pos0 + i) {
              pr = exp(p.scale * dots.qk[u] - str_lse[ii]);
              ds = pr * (dots.dv[u] - str_delta[ii]);
            }
            ss[kr * STR + ii] = pr;
            ps[kr * STR + ii] = ds;
          }
        }
      }
      workgroupBarrier();
      for (var ii = 0u; ii < STR; ii++) {
        let pr = ss[kr * STR + ii];
        let ds = ps[kr * STR + ii];
        for (var t = 0u; t < VPT; t++) {
          let c = td + t * TD;
          if (c < HD4) {
            acc_v[t] = tile_scale_fma(pr, str_b[ii * HD4 + c], acc_v[t]);
            acc_k[t] = tile_scale_fma(ds, str_a[ii * HD4 + c], acc_k[t]);
          }
        }
      }
    }
  }
  return DkvTile(scaled_grad(kr, td, acc_k, j), acc_v);
}

@compute @workgroup_size(OWN * TD)
fn attention_bwd_dq(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let h = wid.y;
  let td = tid % TD;
  let i = wid.x * OWN + tid / TD;
  let tile = dq_tile(tid, b, h, wid.x * OWN);
  if (i < p.Tq) {
    let base = out_index(b, i, h);
    for (var t = 0u; t < VPT; t++) {
      let c = td + t * TD;
      if (c < HD4) { put_dq(base, c, tile.dq[t]); }
    }
    if (DELTA_FROM_O && td == 0u) { delta_w[row_index(b, h, i)] = tile.delta; }
  }
}

@compute @workgroup_size(OWN * TD)
fn attention_bwd_dkv(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let g = wid.y;
  let td = tid % TD;
  let j = wid.x * OWN + tid / TD;
  let tile = dkv_tile(tid, b, g, wid.x * OWN);
  if (j < p.Tk) {
    let base = kv_out_index(b, j, g);
    for (var t = 0u; t < VPT; t++) {
      let c = td + t * TD;
      if (c < HD4) {
        put_dk(base, c, tile.dk[t]);
        put_dv(base, c, tile.dv[t]);
      }
    }
  }
}

// dq, dk and dv in one dispatch (DELTA_FROM_O): workgroup (x, y < nKV) takes key block x of kv
// head y as attention_bwd_dkv does, (x, nKV + h) query block x of head h as attention_bwd_dq does
// (x runs to the larger block count; a workgroup past its own rows returns at once). Each forms
// the delta it needs from o, so neither waits for the other. dq, dk and dv are places of one
// buffer (grads, at dq_off, dk_off, dv_off).
@compute @workgroup_size(OWN * TD)
fn attention_bwd(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let b = wid.z;
  let td = tid % TD;
  let r0 = wid.x * OWN;
  if (wid.y < p.nKV) {
    if (r0 >= p.Tk) { return; }
    let g = wid.y;
    let tile = dkv_tile(tid, b, g, r0);
    let j = r0 + tid / TD;
    if (j < p.Tk) {
      let base = kv_out_index(b, j, g);
      for (var t = 0u; t < VPT; t++) {
        let c = td + t * TD;
        if (c < HD4) {
          put_grad(p.dk_off + base, c, tile.dk[t]);
          put_grad(p.dv_off + base, c, tile.dv[t]);
        }
      }
    }
  } else {
    if (r0 >= p.Tq) { return; }
    let h = wid.y - p.nKV;
    let tile = dq_tile(tid, b, h, r0);
    let i = r0 + tid / TD;
    if (i < p.Tq) {
      let base = out_index(b, i, h);
      for (var t = 0u; t < VPT; t++) {
        let c = td + t * TD;
        if (c < HD4) { put_grad(p.dq_off + base, c, tile.dq[t]); }
      }
    }
  }
}

// ---- rows kernels (CPU-backed adapters): one invocation per row, no workgroup memory ---------
// Streamed rows come four at a time (rows past the end clamped to the last valid one and their
// scores masked), so each of the invocation's own vec4s is read once per four dot products.

const LANES4 = vec4<u32>(0u, 1u, 2u, 3u);

@compute @workgroup_size(WG)
fn attention_fwd_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let i = gid.x;
  let h = wid.y;
  let b = wid.z;
  if (i >= p.Tq) { return; }
  let g = h / p.group;
  var qr: array<vec4<f32>, RMAX>;
  let qb = q_index(b, i, h);
  for (var c = 0u; c < HD4; c++) { qr[c] = q4(qb, c); }
  var acc: array<vec4<f32>, RMAX>;
  var m = MASKED;
  var l = 0.0;
  let end = min(p.Tk, p.pos0 + i + 1u);
  for (var j = 0u; j < end; j += 4u) {
    let rows = min(vec4<u32>(j) + LANES4, vec4<u32>(end - 1u));
    let k0 = k_index(b, rows.x, g);
    let k1 = k_index(b, rows.y, g);
    let k2 = k_index(b, rows.z, g);
    let k3 = k_index(b, rows.w, g);
    var d = vec4<f32>(0.0);
    for (var c = 0u; c < HD4; c++) {
      let x = qr[c];
      d += vec4<f32>(dot(x, k4(k0, c)), dot(x, k4(k1, c)), dot(x, k4(k2, c)), dot(x, k4(k3, c)));
    }
    let s = select(vec4<f32>(MASKED), p.scale * d, vec4<u32>(j) + LANES4 < vec4<u32>(end));
    let m_new = max(m, max(max(s.x, s.y), max(s.z, s.w)));
    let alpha = exp(m - m_new);
    let pr = exp(s - vec4<f32>(m_new));
    l = l * alpha + (pr.x + pr.y + pr.z + pr.w);
    let v0 = v_index(b, rows.x, g);
    let v1 = v_index(b, rows.y, g);
    let v2 = v_index(b, rows.z, g);
    let v3 = v_index(b, rows.w, g);
    for (var c = 0u; c < HD4; c++) {
      acc[c] = acc[c] * alpha + pr.x * v4(v0, c) + pr.y * v4(v1, c) + pr.z * v4(v2, c) + pr.w * v4(v3, c);
    }
    m = m_new;
  }
  let ob = out_index(b, i, h);
  let inv = 1.0 / l;
  for (var c = 0u; c < HD4; c++) { put_o(ob, c, acc[c] * inv); }
  lse_out[row_index(b, h, i)] = m + log(l);
}

@compute @workgroup_size(WG)
fn attention_bwd_dq_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let i = gid.x;
  let h = wid.y;
  let b = wid.z;
  if (i >= p.Tq) { return; }
  let g = h / p.group;
  var qr: array<vec4<f32>, RMAX>;
  var dr: array<vec4<f32>, RMAX>;
  let qb = q_index(b, i, h);
  let ob = out_index(b, i, h);
  for (var c = 0u; c < HD4; c++) {
    qr[c] = q4(qb, c);
    dr[c] = do4(ob, c);
  }
  let lse_i = lse[row_index(b, h, i)];
  let delta_i = row_delta(b, h, i);
  if (DELTA_FROM_O) { delta_w[row_index(b, h, i)] = delta_i; }
  var acc: array<vec4<f32>, RMAX>;
  let end = min(p.Tk, p.pos0 + i + 1u);
  for (var j = 0u; j < end; j += 4u) {
    let rows = min(vec4<u32>(j) + LANES4, vec4<u32>(end - 1u));
    let k0 = k_index(b, rows.x, g);
    let k1 = k_index(b, rows.y, g);
    let k2 = k_index(b, rows.z, g);
    let k3 = k_index(b, rows.w, g);
    let v0 = v_index(b, rows.x, g);
    let v1 = v_index(b, rows.y, g);
    let v2 = v_index(b, rows.z, g);
    let v3 = v_index(b, rows.w, g);
    var s = vec4<f32>(0.0);
    var dp = vec4<f32>(0.0);
    for (var c = 0u; c < HD4; c++) {
      let x = qr[c];
      let y = dr[c];
      s += vec4<f32>(dot(x, k4(k0, c)), dot(x, k4(k1, c)), dot(x, k4(k2, c)), dot(x, k4(k3, c)));
      dp += vec4<f32>(dot(y, v4(v0, c)), dot(y, v4(v1, c)), dot(y, v4(v2, c)), dot(y, v4(v3, c)));
    }
    let pr = select(vec4<f32>(0.0), exp(p.scale * s - vec4<f32>(lse_i)), vec4<u32>(j) + LANES4 < vec4<u32>(end));
    let ds = pr * (dp - vec4<f32>(delta_i));
    for (var c = 0u; c < HD4; c++) {
      acc[c] += ds.x * k4(k0, c) + ds.y * k4(k1, c) + ds.z * k4(k2, c) + ds.w * k4(k3, c);
    }
  }
  for (var c = 0u; c < HD4; c++) {
    var x = acc[c] * p.scale;
    if (ROPE) { x = rope_grad4(x, acc[rope_partner(c)] * p.scale, c, p.pos0 + i); }
    put_dq(ob, c, x);
  }
}

@compute @workgroup_size(WG)
fn attention_bwd_dkv_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let j = gid.x;
  let g = wid.y;
  let b = wid.z;
  if (j >= p.Tk) { return; }
  var kr: array<vec4<f32>, RMAX>;
  var vr: array<vec4<f32>, RMAX>;
  let kb = k_index(b, j, g);
  let vb = v_index(b, j, g);
  for (var c = 0u; c < HD4; c++) {
    kr[c] = k4(kb, c);
    vr[c] = v4(vb, c);
  }
  var acc_k: array<vec4<f32>, RMAX>;
  var acc_v: array<vec4<f32>, RMAX>;
  // Query i sees key j iff i ≥ j − pos0.
  var i_start = 0u;
  if (j > p.pos0) { i_start = j - p.pos0; }
  for (var hh = 0u; hh < p.group; hh++) {
    let h = g * p.group + hh;
    for (var i = i_start; i < p.Tq; i += 4u) {
      let rows = min(vec4<u32>(i) + LANES4, vec4<u32>(p.Tq - 1u));
      let q0 = q_index(b, rows.x, h);
      let q1 = q_index(b, rows.y, h);
      let q2 = q_index(b, rows.z, h);
      let q3 = q_index(b, rows.w, h);
      let o0 = out_index(b, rows.x, h);
      let o1 = out_index(b, rows.y, h);
      let o2 = out_index(b, rows.z, h);
      let o3 = out_index(b, rows.w, h);
      var s = vec4<f32>(0.0);
      var dp = vec4<f32>(0.0);
      for (var c = 0u; c < HD4; c++) {
        let x = kr[c];
        let y = vr[c];
        s += vec4<f32>(dot(x, q4(q0, c)), dot(x, q4(q1, c)), dot(x, q4(q2, c)), dot(x, q4(q3, c)));
        dp += vec4<f32>(dot(y, do4(o0, c)), dot(y, do4(o1, c)), dot(y, do4(o2, c)), dot(y, do4(o3, c)));
      }
      let r = vec4<u32>(row_index(b, h, rows.x), row_index(b, h, rows.y), row_index(b, h, rows.z), row_index(b, h, rows.w));
      let lse4 = vec4<f32>(lse[r.x], lse[r.y], lse[r.z], lse[r.w]);
      let delta4 = vec4<f32>(delta[r.x], delta[r.y], delta[r.z], delta[r.w]);
      let pr = select(vec4<f32>(0.0), exp(p.scale * s - lse4), vec4<u32>(i) + LANES4 < vec4<u32>(p.Tq));
      let ds = pr * (dp - delta4);
      for (var c = 0u; c < HD4; c++) {
        acc_v[c] += pr.x * do4(o0, c) + pr.y * do4(o1, c) + pr.z * do4(o2, c) + pr.w * do4(o3, c);
        acc_k[c] += ds.x * q4(q0, c) + ds.y * q4(q1, c) + ds.z * q4(q2, c) + ds.w * q4(q3, c);
      }
    }
  }
  let base = kv_out_index(b, j, g);
  for (var c = 0u; c < HD4; c++) {
    var x = acc_k[c] * p.scale;
    if (ROPE) { x = rope_grad4(x, acc_k[rope_partner(c)] * p.scale, c, j); }
    put_dk(base, c, x);
    put_dv(base, c, acc_v[c]);
  }
}
