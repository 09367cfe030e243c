// matmul.wgsl: tiled matrix product for frozen weights, with an optional low-rank term.
//
//   C[M×N] = alpha · A · opW(W)  +  alpha2 · A2 · opW(B2)  +  beta · C  (+ bias[N])
//
//   A is stored M×K (activations: x, or dy in the backward).
//   opW(W) = Wᵀ when W is stored N×K (TRANS_W: a weight as nn.Linear keeps it, out×in), or
//            W  when W is stored K×N (the backward's dx = dy·W0 uses W0 untransposed).
//
// The second term is where LoRA fuses: the forward y = x·W0ᵀ + s·h·Bᵀ passes A2 = h (T×r) and
// B2 = B (out×r); the backward dx = dy·W0 + s·g·A passes A2 = g (T×r) and B2 = A (r×in). In both
// cases B2 has W's layout, so the r-long loop continues the same tile accumulators and the
// low-rank product never makes its own pass over C. K2 = 0 turns it off.
//
// Bindings, group 0:
//   0 p     uniform Params
//   1 a     A,  M×K            f32, read as vec4 (buffers are padded to 16 bytes)
//   2 w     W,  N×K or K×N     f32 or packed f16 (W_F16: two halves per u32), read as vec4<u32>,
//                              or llama.cpp's Q8_0 / Q4_0 blocks (W_Q8_0, W_Q4_0; below)
//   3 bias  N                  f32, read only when p.has_bias != 0
//   4 a2    A2, M×K2           f32, read as vec4 (matmul_lora_h: LoRA's A, K2×K; its h, M×K2, is
//                              written to 17 h_out)
//   5 b2    B2, N×K2 or K2×N   f32, read as vec4
//   6 c     C,  M×N            f32, written; read first when p.beta != 0 (accumulate)
// (matmul_sum_lr also binds 10 A3, 11 W3 and 22 W4: see there.)
//
// Two entry points over the same bindings: `matmul` (tiled, below) and `matvec` (at the end: up
// to four rows of A against Wᵀ, the decode step's shape). matmul_rope and matvec_rope are the
// same with RoPE applied as C is stored (13 rope_freq besides; see "RoPE epilogue"), so the q and
// k projections need no rotation dispatch. matmul_lora_h (and _rope) forms the LoRA h = x·Aᵀ
// itself from the staged tiles of x, so that an adapted projection is one dispatch (see there).
//
// Tiling: a workgroup of WG_X×WG_Y invocations owns a (4·WG_Y)×(4·WG_X) tile of C; each
// invocation keeps a 4×4 block in registers. K advances TK at a time through workgroup memory,
// staged as vec4s along the contiguous dimension of each operand, so staging is a straight copy:
//   a_tile[m][k/4]                     (rows padded by one vec4 against bank conflicts)
//   w_tile[n][k/4] when TRANS_W        (dot products of a row of A with a row of W)
//   w_tile[k][n/4] otherwise           (outer products of A's scalars with W's vec4 rows)
// The tiles hold tile_t, and tile_dots / tile_axpy form the products: f32 (tile_f32.wgsl), or f16
// with f32 accumulation (tile_f16.wgsl, adapters with shader-f16), chosen per pipeline by matmul.ts.
// ALIGNED (the contiguous dimensions of A and W, and w_off, are multiples of 4) loads whole vec4s;
// otherwise each of the four elements is fetched and bounds-checked on its own.
//
// W may be a slice of a larger tensor: p.w_off elements are skipped first (a chunk of the rows of
// the LM head's vocabulary, say), and p.N (or p.K) rows of it are used.
//
// Quantized W (frozen weights only): blocks of 32 consecutive elements along W's stored rows, each
// with one f16 scale d, as packages/core/src/quant.ts lays them out: first every block's quants
// in ggml's byte order, then the scales, two per u32, from word p.w_scales on.
//   Q8_0: 32 bytes per block, element j is the int8 in byte j; value q·d.
//   Q4_0: 16 bytes per block, byte j holds element j (low nibble) and element j + 16 (high nibble);
//         value (q - 8)·d.
// Each element is dequantized as it is staged, so no full-precision copy of W exists anywhere; the
// staged values are exactly q·d (an int times an f16 is exact in f32). Rows are whole blocks, so
// an aligned vec4 never crosses a block: its four quants are one u32 word (Q8_0: its four bytes;
// Q4_0: the low or the high nibbles of one word).

struct Params {
  M: u32,
  N: u32,
  K: u32,
  K2: u32,
  alpha: f32,
  alpha2: f32,
  beta: f32,
  has_bias: u32,
  w_off: u32,   // elements of W before its first row used here (a vocabulary chunk of the LM head)
  w_scales: u32,  // quantized W: the u32 word where its block scales start (0 otherwise)
  K3: u32,        // matmul_sum: the inner dimension of A3·opW(W3) (0 elsewhere)
  w3_scales: u32, // quantized W3: as w_scales
  rope_half: u32,     // ROPE: half the head size
  rope_T: u32,        // ROPE: row m is at position rope_pos0 + m % rope_T
  rope_pos0: u32,
  rope_scaling: f32,  // ROPE: HF's attention_scaling
  a3_off: u32,    // matmul_sum_lr: where A3's first operand starts in its buffer (elements; 0 elsewhere)
  K4: u32,        // matmul_sum_lr: the inner dimension of the third product A4·opW(W4) (0: none)
  a4_off: u32,    // matmul_sum_lr: where A4 starts in A3's buffer
  w4_scales: u32, // quantized W4: as w_scales
  a2_off: u32,    // where A2 starts in its binding (matmul_sum_lr binds a span of places; 0 elsewhere)
  b2_off: u32,    // where B2 starts in its buffer
  K2b: u32,       // matmul_sum_lr: the rank of the second low-rank term (0: none)
  a2b_off: u32,   // matmul_sum_lr: where the second term's A2 starts in A2's buffer
  b2b_off: u32,   // matmul_sum_lr: where its B2 starts in B2's buffer
  alpha2b: f32,   // matmul_sum_lr: its scale
  ce_start: u32,  // matmul_dlogits: the vocabulary entry of A's first column
  ce_vocab: u32,  // matmul_dlogits: the vocabulary size (labels outside [0, vocab) are ignored)
  qkv_nk: u32,    // matmul_qkv: k's width (q's is N)
  qkv_nv: u32,    // matmul_qkv: v's width
  qkv_q_off: u32, // matmul_qkv: where q, k and v start in C's binding (elements)
  qkv_k_off: u32,
  qkv_v_off: u32,
  qkv_lr: u32,    // matmul_qkv: each projection's low-rank term, 2 bits each from q's (0 none, 1..3 the first..third)
  K2c: u32,       // matmul_qkv, matmul_sum_lr: the rank of the third low-rank term (0: none)
  a2c_off: u32,   // matmul_qkv, matmul_sum_lr: where its A2 starts in A2's binding
  b2c_off: u32,   // matmul_qkv, matmul_sum_lr: where its B2 starts in B2's
  alpha2c: f32,   // matmul_qkv, matmul_sum_lr: its scale
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> a2: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> b2: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> c: array<f32>;

override WG_X: u32 = 16;     // invocations along N; the tile is 4·WG_X columns
override WG_Y: u32 = 16;     // invocations along M; the tile is 4·WG_Y rows
override TK: u32 = 16;       // K step staged in workgroup memory (a multiple of 4)
override TRANS_W: bool = true;
override W_F16: bool = false;
override W_Q8_0: bool = false;  // W holds Q8_0 blocks (see the header)
override W_Q4_0: bool = false;  // W holds Q4_0 blocks
override ALIGNED: bool = false;
override ALIGNED_LR: bool = false;  // the same for A2 and B2: K2 (and N when !TRANS_W) multiples of 4
override LR_DIRECT: bool = false;   // the low-rank term in f32 from memory (low_rank_direct): f16 tiles
// Every product read straight from the buffers, no tiles and no barriers (see "direct products").
// matmul, matmul_resid, matmul_rope, matmul_act(_bwd), matmul_sum(_lr), matmul_glu and
// matmul_pair(_rope) only.
override DIRECT: bool = false;
// RoPE as the product is stored (the q and k projections; see "RoPE epilogue" below): bit 0
// rotates C, bit 1 up_out (matmul_pair's and matvec_pair's second projection). TRANS_W only.
override ROPE: u32 = 0u;

var<workgroup> a_tile: array<vec4<tile_t>, 4u * WG_Y * (TK / 4u + 1u)>;
// [n][k/4] needs 4·WG_X·(TK/4 + 1) vec4s, [k][n/4] needs TK·WG_X: the first is always larger.
var<workgroup> w_tile: array<vec4<tile_t>, 4u * WG_X * (TK / 4u + 1u)>;

// ---- loading four consecutive elements ------------------------------------------------------

fn a_elem(e: u32) -> f32 {
  return a[e / 4u][e % 4u];
}

// A[r][col..col+3], zero outside M×K.
fn a_chunk(r: u32, col: u32) -> vec4<f32> {
  if (r >= p.M || col >= p.K) { return vec4<f32>(0.0); }
  let e = r * p.K + col;
  if (ALIGNED) { return a[e / 4u]; }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < p.K) { v[i] = a_elem(e + i); }
  }
  return v;
}

// ---- decoding W's storage formats (shared by W and W3) --------------------------------------
//
// Each operand reads its own words (w_word, w3_word); these turn them into values. e is the
// element's index in the operand, d its block's scale.

fn scale_half(word: u32, b: u32) -> f32 {
  return unpack2x16float(word)[b % 2u];
}

fn f16_one(word: u32, e: u32) -> f32 {
  return unpack2x16float(word)[e % 2u];
}

// Elements e..e+3 (e a multiple of 4) from the vec4 of words holding e..e+7.
fn f16_four(q: vec4<u32>, e: u32) -> vec4<f32> {
  if ((e / 4u) % 2u == 0u) { return vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)); }
  return vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
}

fn q8_0_one(word: u32, e: u32, d: f32) -> f32 {
  return f32(extractBits(bitcast<i32>(word), 8u * (e % 4u), 8u)) * d;
}

// Elements e..e+3, e a multiple of 4: the four bytes of one word.
fn q8_0_four(word: u32, d: f32) -> vec4<f32> {
  let v = bitcast<i32>(word);
  let q = vec4<i32>(extractBits(v, 0u, 8u), extractBits(v, 8u, 8u), extractBits(v, 16u, 8u), extractBits(v, 24u, 8u));
  return vec4<f32>(q) * d;
}

// The byte of Q4_0 element e: byte j of a block holds elements j (low nibble) and j + 16 (high).
fn q4_0_byte(e: u32) -> u32 {
  return (e / 32u) * 16u + (e % 32u) % 16u;
}

fn q4_0_one(word: u32, e: u32, d: f32) -> f32 {
  let q = extractBits(word, 8u * (q4_0_byte(e) % 4u) + 4u * ((e % 32u) / 16u), 4u);
  return (f32(q) - 8.0) * d;
}

// Elements e..e+3, e a multiple of 4: the low (first half of the block) or high nibbles of the
// four bytes of one word.
fn q4_0_four(word: u32, e: u32, d: f32) -> vec4<f32> {
  let x = word >> (4u * ((e % 32u) / 16u));
  let q = vec4<u32>(x & 0xfu, (x >> 8u) & 0xfu, (x >> 16u) & 0xfu, (x >> 24u) & 0xfu);
  return (vec4<f32>(q) - 8.0) * d;
}

// ---- W --------------------------------------------------------------------------------------------

fn w_word(i: u32) -> u32 {
  return w[i / 4u][i % 4u];
}

// The f16 scale of block b.
fn w_scale(b: u32) -> f32 {
  return scale_half(w_word(p.w_scales + b / 2u), b);
}

fn w_elem(e: u32) -> f32 {
  if (W_Q8_0) { return q8_0_one(w_word(e / 4u), e, w_scale(e / 32u)); }
  if (W_Q4_0) { return q4_0_one(w_word(q4_0_byte(e) / 4u), e, w_scale(e / 32u)); }
  if (W_F16) { return f16_one(w_word(e / 2u), e); }
  return bitcast<f32>(w_word(e));
}

// Elements e..e+3, e a multiple of 4.
fn w_four(e: u32) -> vec4<f32> {
  if (W_Q8_0) { return q8_0_four(w_word(e / 4u), w_scale(e / 32u)); }
  if (W_Q4_0) { return q4_0_four(w_word(q4_0_byte(e) / 4u), e, w_scale(e / 32u)); }
  if (W_F16) { return f16_four(w[e / 8u], e); }
  return bitcast<vec4<f32>>(w[e / 4u]);
}

// W stored rows×cols: W[r][col..col+3], zero outside.
fn w_chunk(r: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
  if (r >= rows || col >= cols) { return vec4<f32>(0.0); }
  let e = p.w_off + r * cols + col;
  if (ALIGNED) { return w_four(e); }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < cols) { v[i] = w_elem(e + i); }
  }
  return v;
}

// A2[r][col..col+3] times alpha, A2 being M×K at element off of its buffer (zero outside).
fn a2_at(r: u32, col: u32, K: u32, off: u32, alpha: f32) -> vec4<f32> {
  if (r >= p.M || col >= K) { return vec4<f32>(0.0); }
  let e = off + r * K + col;
  if (ALIGNED_LR) { return alpha * a2[e / 4u]; }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < K) { v[i] = alpha * a2[(e + i) / 4u][(e + i) % 4u]; }
  }
  return v;
}

fn a2_chunk(r: u32, col: u32) -> vec4<f32> {
  return a2_at(r, col, p.K2, p.a2_off, p.alpha2);
}

// B2[r][col..col+3], B2 being rows×cols at element off of its buffer (zero outside).
fn b2_at(r: u32, col: u32, rows: u32, cols: u32, off: u32) -> vec4<f32> {
  if (r >= rows || col >= cols) { return vec4<f32>(0.0); }
  let e = off + r * cols + col;
  if (ALIGNED_LR) { return b2[e / 4u]; }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < cols) { v[i] = b2[(e + i) / 4u][(e + i) % 4u]; }
  }
  return v;
}

fn b2_chunk(r: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
  return b2_at(r, col, rows, cols, p.b2_off);
}

// ---- RoPE epilogue ----------------------------------------------------------------------------
//
// RoPE pairs column i of a head with column i + half. So that both are in one invocation's four
// columns, ROPE != 0 maps the kernels' column index n (tiles, matvec groups) to the output column
// out_col(n): group g = n / 4 of head h covers columns j, j + 1, j + half, j + half + 1 of it
// (j = 2·(g % (half / 2))). W's (and B2's, W3's) rows are staged in that order and the store
// writes each value to its own column, so the product is unchanged and only the order in which
// the columns are computed moves. N is a whole number of heads, half is even (matmul.ts checks).
// The rotation is rope.wgsl's rope_fwd (the same θ = f32(pos)·inv_freq[i] and cos_sin), with
// pos = rope_pos0 + m % rope_T: training, evaluation and prefill without a positions buffer.
@group(0) @binding(13) var<storage, read> rope_freq: array<f32>;

fn out_col(n: u32) -> u32 {
  if (ROPE == 0u) { return n; }
  let groups = p.rope_half / 2u;  // groups of four columns per head
  let g = n / 4u;
  let e = n % 4u;
  return (g / groups) * 2u * p.rope_half + 2u * (g % groups) + e % 2u + (e / 2u) * p.rope_half;
}

// (c, s) of the two frequencies of group n (columns j, j + 1, j + half, j + half + 1) at row m:
// (c0, s0, c1, s1).
fn rope_factors(m: u32, n: u32) -> vec4<f32> {
  let i = out_col(n) % (2u * p.rope_half);
  let pos = f32(p.rope_pos0 + m % p.rope_T);
  return vec4<f32>(cos_sin(pos * rope_freq[i]), cos_sin(pos * rope_freq[i + 1u])) * p.rope_scaling;
}

fn rope_apply(f: vec4<f32>, v: vec4<f32>) -> vec4<f32> {
  let c0 = f.xy;
  let c1 = f.zw;
  return vec4<f32>(
    v.x * c0.x - v.z * c0.y,
    v.y * c1.x - v.w * c1.y,
    v.z * c0.x + v.x * c0.y,
    v.w * c1.x + v.y * c1.y,
  );
}

// The four values of group n at row m, rotated.
fn rope_rotate(m: u32, n: u32, v: vec4<f32>) -> vec4<f32> {
  return rope_apply(rope_factors(m, n), v);
}

// C[m][out_col(n..n+3)] = v (+ bias), rotated (bit 0 of ROPE); no beta (matmul.ts refuses it).
fn store_rope(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M || n >= p.N) { return; }
  var x = v;
  for (var j = 0u; j < 4u; j++) {
    if (p.has_bias != 0u) { x[j] += bias[out_col(n + j)]; }
  }
  if ((ROPE & 1u) != 0u) { x = rope_rotate(m, n, x); }
  for (var j = 0u; j < 4u; j++) { c[m * p.N + out_col(n + j)] = x[j]; }
}

// ---- staging ----------------------------------------------------------------------------------

fn a_stride() -> u32 { return TK / 4u + 1u; }

// Stages columns k0..k0+TK of A (or of alpha2·A2 when low_rank).
fn stage_a(tid: u32, m0: u32, k0: u32, low_rank: bool) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    let row = i / chunks;
    let q = i % chunks;
    var v: vec4<f32>;
    if (low_rank) { v = a2_chunk(m0 + row, k0 + q * 4u); } else { v = a_chunk(m0 + row, k0 + q * 4u); }
    a_tile[row * a_stride() + q] = vec4<tile_t>(v);
  }
}

// Stages W (or B2) for columns n0.. of C and k0..k0+TK, in the layout of TRANS_W.
fn stage_w(tid: u32, n0: u32, k0: u32, low_rank: bool) {
  let kdim = select(p.K, p.K2, low_rank);
  if (TRANS_W) {
    let chunks = TK / 4u;
    for (var i = tid; i < 4u * WG_X * chunks; i += WG_X * WG_Y) {
      let row = i / chunks;
      let q = i % chunks;
      var v: vec4<f32>;
      if (low_rank) { v = b2_chunk(out_col(n0 + row), k0 + q * 4u, p.N, kdim); }
      else { v = w_chunk(out_col(n0 + row), k0 + q * 4u, p.N, kdim); }
      w_tile[row * a_stride() + q] = vec4<tile_t>(v);
    }
  } else {
    for (var i = tid; i < TK * WG_X; i += WG_X * WG_Y) {
      let kk = i / WG_X;
      let q = i % WG_X;
      var v: vec4<f32>;
      if (low_rank) { v = b2_chunk(k0 + kk, n0 + q * 4u, kdim, p.N); }
      else { v = w_chunk(k0 + kk, n0 + q * 4u, kdim, p.N); }
      w_tile[kk * WG_X + q] = vec4<tile_t>(v);
    }
  }
}

// acc[i][j] += Σ_k A[4ty+i][k] · opW(W)[k][4tx+j] over the staged TK. The accumulators go in and
// out by value (no pointer), which keeps them in registers on every backend we measured.
fn multiply_tile(acc_in: mat4x4<f32>, tx: u32, ty: u32) -> mat4x4<f32> {
  var acc = acc_in;
  let s = a_stride();
  for (var q = 0u; q < TK / 4u; q++) {
    let a0 = a_tile[(ty * 4u + 0u) * s + q];
    let a1 = a_tile[(ty * 4u + 1u) * s + q];
    let a2v = a_tile[(ty * 4u + 2u) * s + q];
    let a3 = a_tile[(ty * 4u + 3u) * s + q];
    if (TRANS_W) {
      let w0 = w_tile[(tx * 4u + 0u) * s + q];
      let w1 = w_tile[(tx * 4u + 1u) * s + q];
      let w2 = w_tile[(tx * 4u + 2u) * s + q];
      let w3 = w_tile[(tx * 4u + 3u) * s + q];
      acc[0] = tile_dots(acc[0], a0, w0, w1, w2, w3);
      acc[1] = tile_dots(acc[1], a1, w0, w1, w2, w3);
      acc[2] = tile_dots(acc[2], a2v, w0, w1, w2, w3);
      acc[3] = tile_dots(acc[3], a3, w0, w1, w2, w3);
    } else {
      // Written out rather than looped over kk: a vector indexed by a loop variable is not
      // always unrolled, and a dynamic component index is slow on several backends.
      let w0 = w_tile[(q * 4u + 0u) * WG_X + tx];
      let w1 = w_tile[(q * 4u + 1u) * WG_X + tx];
      let w2 = w_tile[(q * 4u + 2u) * WG_X + tx];
      let w3 = w_tile[(q * 4u + 3u) * WG_X + tx];
      acc[0] = tile_axpy(acc[0], a0, w0, w1, w2, w3);
      acc[1] = tile_axpy(acc[1], a1, w0, w1, w2, w3);
      acc[2] = tile_axpy(acc[2], a2v, w0, w1, w2, w3);
      acc[3] = tile_axpy(acc[3], a3, w0, w1, w2, w3);
    }
  }
  return acc;
}

// C[m][n..n+3] = v (+ bias) (+ beta·C), the columns inside N only.
fn store_row(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M) { return; }
  for (var j = 0u; j < 4u; j++) {
    if (n + j >= p.N) { return; }
    var x = v[j];
    if (p.has_bias != 0u) { x += bias[n + j]; }
    if (p.beta != 0.0) { x += p.beta * c[m * p.N + n + j]; }
    c[m * p.N + n + j] = x;
  }
}

// ---- direct products (DIRECT) -------------------------------------------------------------------
//
// Where a driver runs a workgroup's invocations on the CPU, workgroup memory is the same cache the
// buffers are read through, and every barrier suspends and resumes each invocation. On lavapipe
// staging then costs more than it saves (GpuContext.matmulStaging measures it), so with DIRECT
// each invocation reads its four rows of A and the four rows or columns of W its block needs
// straight from the buffers, four k at a time. The operands go through tile_t and tile_dots /
// tile_axpy as staged ones would, in the same order of k: the sums are the tiles' own. (The
// low-rank terms are read in f32 as low_rank_direct reads them; staged f32 tiles hold the same.)

// acc plus one step of four k: a0..a3 are A's rows m..m+3 at k..k+3; w0..w3 are W's rows n..n+3
// at k..k+3 (TRANS_W) or its rows k..k+3 at columns n..n+3, as stage_w lays them out.
fn block_step(acc_in: mat4x4<f32>, a0: vec4<f32>, a1: vec4<f32>, a2v: vec4<f32>, a3: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3v: vec4<f32>) -> mat4x4<f32> {
  var acc = acc_in;
  let v0 = vec4<tile_t>(w0);
  let v1 = vec4<tile_t>(w1);
  let v2 = vec4<tile_t>(w2);
  let v3 = vec4<tile_t>(w3v);
  if (TRANS_W) {
    acc[0] = tile_dots(acc[0], vec4<tile_t>(a0), v0, v1, v2, v3);
    acc[1] = tile_dots(acc[1], vec4<tile_t>(a1), v0, v1, v2, v3);
    acc[2] = tile_dots(acc[2], vec4<tile_t>(a2v), v0, v1, v2, v3);
    acc[3] = tile_dots(acc[3], vec4<tile_t>(a3), v0, v1, v2, v3);
  } else {
    acc[0] = tile_axpy(acc[0], vec4<tile_t>(a0), v0, v1, v2, v3);
    acc[1] = tile_axpy(acc[1], vec4<tile_t>(a1), v0, v1, v2, v3);
    acc[2] = tile_axpy(acc[2], vec4<tile_t>(a2v), v0, v1, v2, v3);
    acc[3] = tile_axpy(acc[3], vec4<tile_t>(a3), v0, v1, v2, v3);
  }
  return acc;
}

// Operand j of block_step from W (inner dimension K) for columns n.. at k: W's row out_col(n + j)
// at k..k+3 (TRANS_W), or its row k + j at n..n+3, as stage_w reads them. w3_row and w4_row are the
// same from W3 and W4 (separate functions: an entry binds only the weights it names).
fn w_row(j: u32, k: u32, n: u32, K: u32) -> vec4<f32> {
  if (TRANS_W) { return w_chunk(out_col(n + j), k, p.N, K); }
  return w_chunk(k + j, n, K, p.N);
}

// main_product without tiles.
fn direct_product(tx: u32, ty: u32, m0: u32, n0: u32) -> mat4x4<f32> {
  var acc = mat4x4<f32>();
  let m = m0 + ty * 4u;
  let n = n0 + tx * 4u;
  for (var k = 0u; k < p.K; k += 4u) {
    acc = block_step(acc, a_chunk(m, k), a_chunk(m + 1u, k), a_chunk(m + 2u, k), a_chunk(m + 3u, k), w_row(0u, k, n, p.K), w_row(1u, k, n, p.K), w_row(2u, k, n, p.K), w_row(3u, k, n, p.K));
  }
  return acc;
}

// Σ over K of A·opW(W) for this invocation's 4×4 block (rows m0 + 4ty.., columns n0 + 4tx..).
fn main_product(tid: u32, tx: u32, ty: u32, m0: u32, n0: u32) -> mat4x4<f32> {
  if (DIRECT) { return direct_product(tx, ty, m0, n0); }
  var acc = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a(tid, m0, k0, false);
    stage_w(tid, n0, k0, false);
    workgroupBarrier();
    acc = multiply_tile(acc, tx, ty);
    workgroupBarrier();
  }
  return acc;
}

// The low-rank term continues the same accumulators (alpha2 is applied as A2 is staged).
fn low_rank_product(acc_in: mat4x4<f32>, tid: u32, tx: u32, ty: u32, m0: u32, n0: u32) -> mat4x4<f32> {
  if (LR_DIRECT || DIRECT) { return low_rank_direct(acc_in, tx, ty, m0, n0); }
  var acc = acc_in;
  for (var k0 = 0u; k0 < p.K2; k0 += TK) {
    stage_a(tid, m0, k0, true);
    stage_w(tid, n0, k0, true);
    workgroupBarrier();
    acc = multiply_tile(acc, tx, ty);
    workgroupBarrier();
  }
  return acc;
}

// The low-rank term in f32 straight from A2 and B2, not through the tiles: with f16 tiles
// (LR_DIRECT, TRANS_W), where a LoRA B that starts at zero and stays small would lose most of its
// bits or flush to zero staged in f16, and with DIRECT. r is small (a LoRA rank), and the WG_X
// invocations that share a row of A2 (the WG_Y that share a row of B2) read it at the same time,
// so it comes from cache.
fn low_rank_direct(acc_in: mat4x4<f32>, tx: u32, ty: u32, m0: u32, n0: u32) -> mat4x4<f32> {
  return low_rank_direct_term(acc_in, tx, ty, m0, n0, p.K2, p.a2_off, p.b2_off, p.alpha2);
}

// low_rank_direct for a term of rank K (alpha·A2 at a_off in A2's binding, B2 at b_off in B2's):
// matmul_qkv's terms with f16 tiles.
// B2 is read in the layout of TRANS_W, as stage_lr_term reads it.
fn low_rank_direct_term(acc_in: mat4x4<f32>, tx: u32, ty: u32, m0: u32, n0: u32, K: u32, a_off: u32, b_off: u32, alpha: f32) -> mat4x4<f32> {
  var acc = acc_in;
  let m = m0 + ty * 4u;
  let n = n0 + tx * 4u;
  for (var k = 0u; k < K; k += 4u) {
    let a0 = a2_at(m + 0u, k, K, a_off, alpha);
    let a1 = a2_at(m + 1u, k, K, a_off, alpha);
    let a2v = a2_at(m + 2u, k, K, a_off, alpha);
    let a3 = a2_at(m + 3u, k, K, a_off, alpha);
    if (TRANS_W) {
      let b0 = b2_at(out_col(n + 0u), k, p.N, K, b_off);
      let b1 = b2_at(out_col(n + 1u), k, p.N, K, b_off);
      let b2v = b2_at(out_col(n + 2u), k, p.N, K, b_off);
      let b3 = b2_at(out_col(n + 3u), k, p.N, K, b_off);
      acc[0] += vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2v), dot(a0, b3));
      acc[1] += vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2v), dot(a1, b3));
      acc[2] += vec4<f32>(dot(a2v, b0), dot(a2v, b1), dot(a2v, b2v), dot(a2v, b3));
      acc[3] += vec4<f32>(dot(a3, b0), dot(a3, b1), dot(a3, b2v), dot(a3, b3));
    } else {
      let b0 = b2_at(k + 0u, n, K, p.N, b_off);
      let b1 = b2_at(k + 1u, n, K, p.N, b_off);
      let b2v = b2_at(k + 2u, n, K, p.N, b_off);
      let b3 = b2_at(k + 3u, n, K, p.N, b_off);
      acc[0] = fma(vec4<f32>(a0.x), b0, fma(vec4<f32>(a0.y), b1, fma(vec4<f32>(a0.z), b2v, fma(vec4<f32>(a0.w), b3, acc[0]))));
      acc[1] = fma(vec4<f32>(a1.x), b0, fma(vec4<f32>(a1.y), b1, fma(vec4<f32>(a1.z), b2v, fma(vec4<f32>(a1.w), b3, acc[1]))));
      acc[2] = fma(vec4<f32>(a2v.x), b0, fma(vec4<f32>(a2v.y), b1, fma(vec4<f32>(a2v.z), b2v, fma(vec4<f32>(a2v.w), b3, acc[2]))));
      acc[3] = fma(vec4<f32>(a3.x), b0, fma(vec4<f32>(a3.y), b1, fma(vec4<f32>(a3.z), b2v, fma(vec4<f32>(a3.w), b3, acc[3]))));
    }
  }
  return acc;
}

// This invocation's 4×4 block of the product, before the store adds bias and beta·C.
fn tile_product(lid: vec3<u32>, wid: vec3<u32>) -> mat4x4<f32> {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  let acc = main_product(tid, lid.x, lid.y, m0, n0) * p.alpha;
  return low_rank_product(acc, tid, lid.x, lid.y, m0, n0);
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = tile_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  // One call per row with a constant index, so the accumulators are never indexed dynamically.
  store_row(m + 0u, n, acc[0]);
  store_row(m + 1u, n, acc[1]);
  store_row(m + 2u, n, acc[2]);
  store_row(m + 3u, n, acc[3]);
}

// matmul_resid: matmul whose store adds a residual from another buffer (16 resid, M×N, read) in
// place of beta·C, so that a block's last projection writes x + f(x) where x is not kept (the
// down projection when its RMSNorm ran inside matmul_glu_norm, which copies nothing). 7 storage
// buffers.
@group(0) @binding(16) var<storage, read> resid: array<f32>;

fn store_row_resid(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M) { return; }
  for (var j = 0u; j < 4u; j++) {
    if (n + j >= p.N) { return; }
    var x = v[j];
    if (p.has_bias != 0u) { x += bias[n + j]; }
    c[m * p.N + n + j] = x + resid[m * p.N + n + j];
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_resid(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = tile_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_row_resid(m + 0u, n, acc[0]);
  store_row_resid(m + 1u, n, acc[1]);
  store_row_resid(m + 2u, n, acc[2]);
  store_row_resid(m + 3u, n, acc[3]);
}

// matmul_lora_h: the LoRA forward y = alpha·A·Wᵀ + alpha2·h·B2ᵀ (+ bias, + beta·C) in one
// dispatch, h = A·LAᵀ (LA: LoRA's A, r×K) computed here from the tiles of A that the main product
// stages anyway, instead of by a thin dispatch of its own before it. Each workgroup forms h for
// its own rows in workgroup memory (so the workgroups along a row of tiles each form it again: r
// more products per staged element, against the tile's 4·WG_X columns), then adds h·B2ᵀ for its
// columns in f32, and the workgroups of the first column of tiles store h (17 h_out, M×r), which
// the backward's dB reads. Binding 4 holds LA here, not A2. W transposed; p.K2 = r. With f16 tiles,
// h is formed in f32 from the f16-staged A (what the f16 main product multiplies too).
// 7 storage buffers.
@group(0) @binding(17) var<storage, read_write> h_out: array<f32>;

override H_R: u32 = 4u;  // p.K2 rounded up to a multiple of 4: h's row stride in workgroup memory
var<workgroup> h_ws: array<f32, 4u * WG_Y * H_R>;
var<workgroup> la_tile: array<vec4<f32>, H_R * (TK / 4u)>;  // LA[j][k0..k0+TK], f32

// LA[j][col..col+3] (binding 4), zero outside r×K.
fn lora_a_chunk(j: u32, col: u32) -> vec4<f32> {
  if (j >= p.K2 || col >= p.K) { return vec4<f32>(0.0); }
  let e = j * p.K + col;
  if (ALIGNED) { return a2[e / 4u]; }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < p.K) { v[i] = a2[(e + i) / 4u][(e + i) % 4u]; }
  }
  return v;
}

fn stage_la(tid: u32, k0: u32) {
  let chunks = TK / 4u;
  for (var i = tid; i < H_R * chunks; i += WG_X * WG_Y) {
    la_tile[i] = lora_a_chunk(i / chunks, k0 + (i % chunks) * 4u);
  }
}

// h_ws[row][j] += Σ over the staged TK of A[row][k]·LA[j][k], for this invocation's rows (4ty..,
// as in multiply_tile) and ranks tx, tx + WG_X, ...: the same entries at every K step, so they need
// no barrier of their own.
fn accumulate_h(tx: u32, ty: u32) {
  let s = a_stride();
  let chunks = TK / 4u;
  for (var j = tx; j < H_R; j += WG_X) {
    var h = vec4<f32>(0.0);
    for (var q = 0u; q < chunks; q++) {
      let l = la_tile[j * chunks + q];
      h += vec4<f32>(
        dot(vec4<f32>(a_tile[(ty * 4u + 0u) * s + q]), l),
        dot(vec4<f32>(a_tile[(ty * 4u + 1u) * s + q]), l),
        dot(vec4<f32>(a_tile[(ty * 4u + 2u) * s + q]), l),
        dot(vec4<f32>(a_tile[(ty * 4u + 3u) * s + q]), l),
      );
    }
    h_ws[(ty * 4u + 0u) * H_R + j] += h.x;
    h_ws[(ty * 4u + 1u) * H_R + j] += h.y;
    h_ws[(ty * 4u + 2u) * H_R + j] += h.z;
    h_ws[(ty * 4u + 3u) * H_R + j] += h.w;
  }
}

// h_ws[row][k..k+3] (k a multiple of 4, below H_R).
fn h4(row: u32, k: u32) -> vec4<f32> {
  let b = row * H_R + k;
  return vec4<f32>(h_ws[b], h_ws[b + 1u], h_ws[b + 2u], h_ws[b + 3u]);
}

// This invocation's 4×4 block of x·Wᵀ·alpha + alpha2·h·B2ᵀ, h formed on the way; the first column
// of tiles stores h.
fn lora_h_product(lid: vec3<u32>, wid: vec3<u32>) -> mat4x4<f32> {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  for (var j = lid.x; j < H_R; j += WG_X) {
    for (var i = 0u; i < 4u; i++) { h_ws[(lid.y * 4u + i) * H_R + j] = 0.0; }
  }
  var acc = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a(tid, m0, k0, false);
    stage_w(tid, n0, k0, false);
    stage_la(tid, k0);
    workgroupBarrier();
    acc = multiply_tile(acc, lid.x, lid.y);
    accumulate_h(lid.x, lid.y);
    workgroupBarrier();
  }
  acc = acc * p.alpha;
  // The low-rank term from h in workgroup memory (complete after the loop's last barrier); B2's
  // rows in the order the store writes the columns (out_col: RoPE's).
  let r0 = lid.y * 4u;
  let n = n0 + lid.x * 4u;
  for (var k = 0u; k < p.K2; k += 4u) {
    let b0 = b2_chunk(out_col(n + 0u), k, p.N, p.K2);
    let b1 = b2_chunk(out_col(n + 1u), k, p.N, p.K2);
    let b2v = b2_chunk(out_col(n + 2u), k, p.N, p.K2);
    let b3 = b2_chunk(out_col(n + 3u), k, p.N, p.K2);
    let h0 = p.alpha2 * h4(r0 + 0u, k);
    let h1 = p.alpha2 * h4(r0 + 1u, k);
    let h2 = p.alpha2 * h4(r0 + 2u, k);
    let h3 = p.alpha2 * h4(r0 + 3u, k);
    acc[0] += vec4<f32>(dot(h0, b0), dot(h0, b1), dot(h0, b2v), dot(h0, b3));
    acc[1] += vec4<f32>(dot(h1, b0), dot(h1, b1), dot(h1, b2v), dot(h1, b3));
    acc[2] += vec4<f32>(dot(h2, b0), dot(h2, b1), dot(h2, b2v), dot(h2, b3));
    acc[3] += vec4<f32>(dot(h3, b0), dot(h3, b1), dot(h3, b2v), dot(h3, b3));
  }
  if (wid.x == 0u) {
    for (var e = tid; e < 4u * WG_Y * H_R; e += WG_X * WG_Y) {
      let m = m0 + e / H_R;
      let j = e % H_R;
      if (m < p.M && j < p.K2) { h_out[m * p.K2 + j] = h_ws[e]; }
    }
  }
  return acc;
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_lora_h(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = lora_h_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_row(m + 0u, n, acc[0]);
  store_row(m + 1u, n, acc[1]);
  store_row(m + 2u, n, acc[2]);
  store_row(m + 3u, n, acc[3]);
}

// matmul_lora_h stored through the RoPE epilogue (ROPE = 1; + 13 rope_freq): an adapted q or k
// projection in one dispatch. 8 storage buffers.
@compute @workgroup_size(WG_X, WG_Y)
fn matmul_lora_h_rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = lora_h_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_rope(m + 0u, n, acc[0]);
  store_rope(m + 1u, n, acc[1]);
  store_rope(m + 2u, n, acc[2]);
  store_rope(m + 3u, n, acc[3]);
}

// matmul with the RoPE epilogue (ROPE = 1; binding 13 besides matmul's).
@compute @workgroup_size(WG_X, WG_Y)
fn matmul_rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = tile_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_rope(m + 0u, n, acc[0]);
  store_rope(m + 1u, n, acc[1]);
  store_rope(m + 2u, n, acc[2]);
  store_rope(m + 3u, n, acc[3]);
}

// ---- matrix-vector: a few rows of A against Wᵀ (one decode step) ----------------------------
//
// The tiled kernel above computes whole 4·WG_Y-row tiles, so with M = 1 (every decoding step)
// all but one of its rows are wasted work. Here an invocation computes 4 output columns for up to
// MV_M rows of A, and MV_K invocations share those columns by striding along K: consecutive
// invocations read consecutive vec4s of the same W rows (coalesced on a GPU; W is read once in
// all), then matvec_reduce adds their partial sums (a tree in workgroup memory, or subgroup
// operations where the adapter has them). A workgroup holds MV_N such groups side by side.
// On CPU-backed adapters, where every workgroup and barrier has a cost
// and lanes do not coalesce anyway, MV_K = 1 gives each invocation whole rows of W and no
// reduction at all. TRANS_W only: the layout of every forward weight.

const MV_M: u32 = 4u;         // rows of A (planMatmul picks this kernel for M ≤ MV_M)
override MV_K: u32 = 64;      // invocations along K per group of 4 columns; a power of two
override MV_N: u32 = 1;       // groups of 4 columns per workgroup

// This invocation's part of C[m][n0..n0+3] for every row m < MV_M: its stride of K.
fn matvec_partial(lid: vec3<u32>, wid: vec3<u32>) -> array<vec4<f32>, MV_M> {
  let t = lid.x;
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  // The four rows of W (and of B2) behind this group's columns (out_col: the RoPE epilogue's order).
  let r0 = out_col(n0);
  let r1 = out_col(n0 + 1u);
  let r2 = out_col(n0 + 2u);
  let r3 = out_col(n0 + 3u);
  var acc: array<vec4<f32>, MV_M>;
  for (var k = t * 4u; k < p.K; k += MV_K * 4u) {
    let w0 = w_chunk(r0, k, p.N, p.K);
    let w1 = w_chunk(r1, k, p.N, p.K);
    let w2 = w_chunk(r2, k, p.N, p.K);
    let w3v = w_chunk(r3, k, p.N, p.K);
    for (var m = 0u; m < MV_M; m++) {
      if (m < p.M) {
        let x = a_chunk(m, k);
        acc[m] += vec4<f32>(dot(x, w0), dot(x, w1), dot(x, w2), dot(x, w3v));
      }
    }
  }
  for (var m = 0u; m < MV_M; m++) { acc[m] *= p.alpha; }
  // The low-rank term (alpha2 is applied as A2 is read), in the same partial sums.
  for (var k = t * 4u; k < p.K2; k += MV_K * 4u) {
    let b0 = b2_chunk(r0, k, p.N, p.K2);
    let b1 = b2_chunk(r1, k, p.N, p.K2);
    let b2v = b2_chunk(r2, k, p.N, p.K2);
    let b3 = b2_chunk(r3, k, p.N, p.K2);
    for (var m = 0u; m < MV_M; m++) {
      if (m < p.M) {
        let x = a2_chunk(m, k);
        acc[m] += vec4<f32>(dot(x, b0), dot(x, b1), dot(x, b2v), dot(x, b3));
      }
    }
  }
  return acc;
}

// matvec_reduce (C[m][n0..n0+3] from the MV_K invocations' partial sums) and mv_sum come from
// matvec_reduce.wgsl or matvec_reduce_subgroups.wgsl, put before this file by matmul.ts.

fn matvec_product(lid: vec3<u32>, wid: vec3<u32>) -> array<vec4<f32>, MV_M> {
  return matvec_reduce(matvec_partial(lid, wid), lid);
}

@compute @workgroup_size(MV_K, MV_N)
fn matvec(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = matvec_product(lid, wid);
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  if (MV_K == 1u) {
    for (var m = 0u; m < MV_M; m++) { store_row(m, n0, r[m]); }
  } else if (lid.x < MV_M) {
    store_row(lid.x, n0, r[0]);
  }
}

// matvec with the RoPE epilogue (ROPE = 1; binding 13 besides matvec's).
@compute @workgroup_size(MV_K, MV_N)
fn matvec_rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = matvec_product(lid, wid);
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  if (MV_K == 1u) {
    for (var m = 0u; m < MV_M; m++) { store_rope(m, n0, r[m]); }
  } else if (lid.x < MV_M) {
    store_rope(lid.x, n0, r[0]);
  }
}

// ---- activation epilogues ---------------------------------------------------------------------
//
// The same products, stored through the MLP's nonlinearity so that it costs no dispatch of its
// own (matmul.ts puts shaders/act_math.wgsl, the formulas activations.wgsl uses too, in front):
//   matmul_act, matvec_act   the up projection (ACT = 1): c = the product (up, kept for the
//                            backward), act = silu(gate)·up;  GPT-2's c_fc (ACT = 2): c = the
//                            product + bias (the pre-activation), act = gelu_new(c)
//   matmul_act_bwd           the down projection's dx = ∂L/∂act (dy·W + the LoRA term, beta = 0, no
//                            bias), ACT = 1: c = dgate, dup_out = dup;  ACT = 2: c = ∂L/∂pre
// Bindings besides 0..6 (matmul_act_bwd has no bias: binding 3 is left out of its layout, so it
// binds 8 storage buffers, the WebGPU default limit):
//   7 gate_in   the gate projection (ACT = 1), or the pre-activation (matmul_act_bwd, ACT = 2)
//   8 act_out   written: the activation (matmul_act, matvec_act)
//   8 up_in     the up projection (matmul_act_bwd, ACT = 1)
//   9 dup_out   written: ∂L/∂up (matmul_act_bwd, ACT = 1)
@group(0) @binding(7) var<storage, read> gate_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> act_out: array<f32>;
@group(0) @binding(8) var<storage, read> up_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dup_out: array<f32>;

override ACT: u32 = 1u;  // 1 silu·mul, 2 gelu_new

// Four consecutive elements of a row-major M×N operand from `base` (column n), zero past column N.
// One function per buffer: an entry point uses only the ones it names.
fn gate4(base: u32, n: u32) -> vec4<f32> {
  var v = vec4<f32>(0.0);
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) { v[j] = gate_in[base + j]; }
  }
  return v;
}

fn up4(base: u32, n: u32) -> vec4<f32> {
  var v = vec4<f32>(0.0);
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) { v[j] = up_in[base + j]; }
  }
  return v;
}

fn c4(base: u32, n: u32) -> vec4<f32> {
  var v = vec4<f32>(0.0);
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) { v[j] = c[base + j]; }
  }
  return v;
}

// The forward store: C (+ bias, + beta·C) as store_row, and the activation of it.
fn store_act(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M) { return; }
  let base = m * p.N + n;
  var x = v;
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N && p.has_bias != 0u) { x[j] += bias[n + j]; }
  }
  if (p.beta != 0.0) { x += p.beta * c4(base, n); }
  var y: vec4<f32>;
  if (ACT == 1u) { y = silu_mul(gate4(base, n), x); } else { y = gelu_new(x); }
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) {
      c[base + j] = x[j];
      act_out[base + j] = y[j];
    }
  }
}

// The backward store: v is ∂L/∂act; C takes ∂L/∂gate (and dup_out ∂L/∂up) or ∂L/∂pre.
fn store_act_bwd(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M) { return; }
  let base = m * p.N + n;
  let g = gate4(base, n);
  if (ACT == 1u) {
    let grads = silu_mul_grads(v, g, up4(base, n));
    for (var j = 0u; j < 4u; j++) {
      if (n + j < p.N) {
        c[base + j] = grads[0][j];
        dup_out[base + j] = grads[1][j];
      }
    }
  } else {
    let d = v * gelu_new_grad(g);
    for (var j = 0u; j < 4u; j++) {
      if (n + j < p.N) { c[base + j] = d[j]; }
    }
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_act(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = tile_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_act(m + 0u, n, acc[0]);
  store_act(m + 1u, n, acc[1]);
  store_act(m + 2u, n, acc[2]);
  store_act(m + 3u, n, acc[3]);
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_act_bwd(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let acc = tile_product(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_act_bwd(m + 0u, n, acc[0]);
  store_act_bwd(m + 1u, n, acc[1]);
  store_act_bwd(m + 2u, n, acc[2]);
  store_act_bwd(m + 3u, n, acc[3]);
}

@compute @workgroup_size(MV_K, MV_N)
fn matvec_act(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = matvec_product(lid, wid);
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  if (MV_K == 1u) {
    for (var m = 0u; m < MV_M; m++) { store_act(m, n0, r[m]); }
  } else if (lid.x < MV_M) {
    store_act(lid.x, n0, r[0]);
  }
}

// ---- a second dense product, and the gated MLP's two projections in one pass ---------------------
//
//   matmul_sum   C = alpha·(A·opW(W) + A3·opW(W3)) + alpha2·A2·opW(B2) + beta·C (+ bias): the
//                backward's dx of two projections that read the same input (∂L/∂n = dgate·Wg +
//                dup·Wu, or dq·Wq + dk·Wk with q's LoRA term), one dispatch instead of two. A3 is
//                M×K3; W3 has W's layout with K3 in place of K and a storage format of its own.
//   matmul_glu,  the gated MLP's gate and up projections of one input: C = A·Wᵀ (gate), up_out =
//   matvec_glu   A·W3ᵀ (up, W3 N×K like W), act_out = silu(gate)·up. A is staged once for both;
//                no bias or beta (the planners use it for unadapted gate and up only).
//   matmul_pair, two projections of one input, C = A·Wᵀ + alpha2·A2·B2ᵀ (with its LoRA term) and
//   matvec_pair  up_out = A·W3ᵀ: q and k, say. No bias or beta.
// Bindings besides 0..6: 10 a3 (matmul_sum), 11 w3, 12 up_out (the glu and pair entries; glu's
// with 8 act_out).
@group(0) @binding(10) var<storage, read> a3: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read> w3: array<vec4<u32>>;
@group(0) @binding(12) var<storage, read_write> up_out: array<f32>;

override W3_F16: bool = false;
override W3_Q8_0: bool = false;
override W3_Q4_0: bool = false;
override ALIGNED3: bool = false;  // A3's and W3's contiguous dimensions are multiples of 4

fn w3_word(i: u32) -> u32 {
  return w3[i / 4u][i % 4u];
}

fn w3_scale(b: u32) -> f32 {
  return scale_half(w3_word(p.w3_scales + b / 2u), b);
}

fn w3_elem(e: u32) -> f32 {
  if (W3_Q8_0) { return q8_0_one(w3_word(e / 4u), e, w3_scale(e / 32u)); }
  if (W3_Q4_0) { return q4_0_one(w3_word(q4_0_byte(e) / 4u), e, w3_scale(e / 32u)); }
  if (W3_F16) { return f16_one(w3_word(e / 2u), e); }
  return bitcast<f32>(w3_word(e));
}

fn w3_four(e: u32) -> vec4<f32> {
  if (W3_Q8_0) { return q8_0_four(w3_word(e / 4u), w3_scale(e / 32u)); }
  if (W3_Q4_0) { return q4_0_four(w3_word(q4_0_byte(e) / 4u), e, w3_scale(e / 32u)); }
  if (W3_F16) { return f16_four(w3[e / 8u], e); }
  return bitcast<vec4<f32>>(w3[e / 4u]);
}

// W3 stored rows×cols: W3[r][col..col+3], zero outside.
fn w3_chunk(r: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
  if (r >= rows || col >= cols) { return vec4<f32>(0.0); }
  let e = r * cols + col;
  if (ALIGNED3) { return w3_four(e); }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < cols) { v[i] = w3_elem(e + i); }
  }
  return v;
}

// A3[r][col..col+3], A3 being M×K at element off of its buffer (zero outside).
fn a3_chunk(r: u32, col: u32, K: u32, off: u32) -> vec4<f32> {
  if (r >= p.M || col >= K) { return vec4<f32>(0.0); }
  let e = off + r * K + col;
  if (ALIGNED3) { return a3[e / 4u]; }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < K) { v[i] = a3[(e + i) / 4u][(e + i) % 4u]; }
  }
  return v;
}

fn w3_row(j: u32, k: u32, n: u32, K: u32) -> vec4<f32> {
  if (TRANS_W) { return w3_chunk(out_col(n + j), k, p.N, K); }
  return w3_chunk(k + j, n, K, p.N);
}

// A3·opW(W3) over inner dimension K for this invocation's block, without tiles (DIRECT).
fn direct_product3(acc_in: mat4x4<f32>, tx: u32, ty: u32, m0: u32, n0: u32, K: u32, off: u32) -> mat4x4<f32> {
  var acc = acc_in;
  let m = m0 + ty * 4u;
  let n = n0 + tx * 4u;
  for (var k = 0u; k < K; k += 4u) {
    acc = block_step(acc, a3_chunk(m, k, K, off), a3_chunk(m + 1u, k, K, off), a3_chunk(m + 2u, k, K, off), a3_chunk(m + 3u, k, K, off), w3_row(0u, k, n, K), w3_row(1u, k, n, K), w3_row(2u, k, n, K), w3_row(3u, k, n, K));
  }
  return acc;
}

// acc + A3·opW(W3) (A3 at off in its binding, inner dimension K), staged or direct.
fn product3(acc_in: mat4x4<f32>, tid: u32, tx: u32, ty: u32, m0: u32, n0: u32, K: u32, off: u32) -> mat4x4<f32> {
  if (DIRECT) { return direct_product3(acc_in, tx, ty, m0, n0, K, off); }
  var acc = acc_in;
  for (var k0 = 0u; k0 < K; k0 += TK) {
    stage_a3(tid, m0, k0, K, off);
    stage_w3(tid, n0, k0, K);
    workgroupBarrier();
    acc = multiply_tile(acc, tx, ty);
    workgroupBarrier();
  }
  return acc;
}

fn stage_a3(tid: u32, m0: u32, k0: u32, K: u32, off: u32) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    a_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(a3_chunk(m0 + i / chunks, k0 + (i % chunks) * 4u, K, off));
  }
}

// As stage_w, from W3 (inner dimension kdim) into the same tile.
fn stage_w3(tid: u32, n0: u32, k0: u32, kdim: u32) {
  if (TRANS_W) {
    let chunks = TK / 4u;
    for (var i = tid; i < 4u * WG_X * chunks; i += WG_X * WG_Y) {
      w_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(w3_chunk(out_col(n0 + i / chunks), k0 + (i % chunks) * 4u, p.N, kdim));
    }
  } else {
    for (var i = tid; i < TK * WG_X; i += WG_X * WG_Y) {
      w_tile[i] = vec4<tile_t>(w3_chunk(k0 + i / WG_X, n0 + (i % WG_X) * 4u, kdim, p.N));
    }
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_sum(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  var acc = main_product(tid, lid.x, lid.y, m0, n0);
  acc = product3(acc, tid, lid.x, lid.y, m0, n0, p.K3, p.a3_off);
  acc = low_rank_product(acc * p.alpha, tid, lid.x, lid.y, m0, n0);
  let m = m0 + lid.y * 4u;
  let n = n0 + lid.x * 4u;
  store_row(m + 0u, n, acc[0]);
  store_row(m + 1u, n, acc[1]);
  store_row(m + 2u, n, acc[2]);
  store_row(m + 3u, n, acc[3]);
}

// ---- matmul_sum_lr: the dx of up to three projections of one input, and three LoRA terms -----
//
//   C = alpha·(A·opW(W) + A3'·opW(W3) + A4·opW(W4)) + alpha2·A2'·opW(B2') + alpha2b·A2''·opW(B2'')
//       + alpha2c·A2'''·opW(B2''') + beta·C
//
// The backward's dx of a layer's q, k and v (or gate and up) with the LoRA terms s·g·A of the
// adapted ones, in one dispatch. A3' and A4 are places in one buffer (10 a3, at a3_off and a4_off;
// dk and dv, say), the A2 in another (4 a2: LoRA's g slots), the B2 in a third (5 b2: the LoRA
// parameters' arena); each binding is the range of its buffer that holds all its places, and the
// offsets count from its start. W4 (22) is in any of W's storage formats (W4_*). K4 = 0, K2b = 0 or
// K2c = 0 leaves that term out. No bias. Bindings 1, 2, 4, 5, 6, 10, 11, 22: 8 storage buffers.
@group(0) @binding(22) var<storage, read> w4: array<vec4<u32>>;

override W4_F16: bool = false;
override W4_Q8_0: bool = false;
override W4_Q4_0: bool = false;

fn w4_word(i: u32) -> u32 {
  return w4[i / 4u][i % 4u];
}

fn w4_scale(b: u32) -> f32 {
  return scale_half(w4_word(p.w4_scales + b / 2u), b);
}

fn w4_elem(e: u32) -> f32 {
  if (W4_Q8_0) { return q8_0_one(w4_word(e / 4u), e, w4_scale(e / 32u)); }
  if (W4_Q4_0) { return q4_0_one(w4_word(q4_0_byte(e) / 4u), e, w4_scale(e / 32u)); }
  if (W4_F16) { return f16_one(w4_word(e / 2u), e); }
  return bitcast<f32>(w4_word(e));
}

fn w4_four(e: u32) -> vec4<f32> {
  if (W4_Q8_0) { return q8_0_four(w4_word(e / 4u), w4_scale(e / 32u)); }
  if (W4_Q4_0) { return q4_0_four(w4_word(q4_0_byte(e) / 4u), e, w4_scale(e / 32u)); }
  if (W4_F16) { return f16_four(w4[e / 8u], e); }
  return bitcast<vec4<f32>>(w4[e / 4u]);
}

fn w4_chunk(r: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
  if (r >= rows || col >= cols) { return vec4<f32>(0.0); }
  let e = r * cols + col;
  if (ALIGNED3) { return w4_four(e); }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < cols) { v[i] = w4_elem(e + i); }
  }
  return v;
}

fn w4_row(j: u32, k: u32, n: u32, K: u32) -> vec4<f32> {
  if (TRANS_W) { return w4_chunk(out_col(n + j), k, p.N, K); }
  return w4_chunk(k + j, n, K, p.N);
}

// A4·opW(W4) (A4 at off in A3's binding) without tiles (DIRECT), as direct_product3.
fn direct_product4(acc_in: mat4x4<f32>, tx: u32, ty: u32, m0: u32, n0: u32, K: u32, off: u32) -> mat4x4<f32> {
  var acc = acc_in;
  let m = m0 + ty * 4u;
  let n = n0 + tx * 4u;
  for (var k = 0u; k < K; k += 4u) {
    acc = block_step(acc, a3_chunk(m, k, K, off), a3_chunk(m + 1u, k, K, off), a3_chunk(m + 2u, k, K, off), a3_chunk(m + 3u, k, K, off), w4_row(0u, k, n, K), w4_row(1u, k, n, K), w4_row(2u, k, n, K), w4_row(3u, k, n, K));
  }
  return acc;
}

// As stage_w3, from W4.
fn stage_w4(tid: u32, n0: u32, k0: u32, kdim: u32) {
  if (TRANS_W) {
    let chunks = TK / 4u;
    for (var i = tid; i < 4u * WG_X * chunks; i += WG_X * WG_Y) {
      w_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(w4_chunk(out_col(n0 + i / chunks), k0 + (i % chunks) * 4u, p.N, kdim));
    }
  } else {
    for (var i = tid; i < TK * WG_X; i += WG_X * WG_Y) {
      w_tile[i] = vec4<tile_t>(w4_chunk(k0 + i / WG_X, n0 + (i % WG_X) * 4u, kdim, p.N));
    }
  }
}

// Stages a low-rank term of rank K (alpha·A2 at a_off in A2's binding, B2 at b_off in B2's) as
// stage_a and stage_w stage the first.
fn stage_lr_term(tid: u32, m0: u32, n0: u32, k0: u32, K: u32, a_off: u32, b_off: u32, alpha: f32) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    let v = a2_at(m0 + i / chunks, k0 + (i % chunks) * 4u, K, a_off, alpha);
    a_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(v);
  }
  if (TRANS_W) {
    for (var i = tid; i < 4u * WG_X * chunks; i += WG_X * WG_Y) {
      let v = b2_at(out_col(n0 + i / chunks), k0 + (i % chunks) * 4u, p.N, K, b_off);
      w_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(v);
    }
  } else {
    for (var i = tid; i < TK * WG_X; i += WG_X * WG_Y) {
      w_tile[i] = vec4<tile_t>(b2_at(k0 + i / WG_X, n0 + (i % WG_X) * 4u, K, p.N, b_off));
    }
  }
}

// The second low-rank term (alpha2b·A2'', B2'').
fn stage_lr2(tid: u32, m0: u32, n0: u32, k0: u32) {
  stage_lr_term(tid, m0, n0, k0, p.K2b, p.a2b_off, p.b2b_off, p.alpha2b);
}

// matmul_sum_lr's third low-rank term (alpha2c·A2''', B2'''), matmul_qkv's third term's fields.
fn stage_lr3(tid: u32, m0: u32, n0: u32, k0: u32) {
  stage_lr_term(tid, m0, n0, k0, p.K2c, p.a2c_off, p.b2c_off, p.alpha2c);
}

// C[m][n..n+3] = v + beta·C, the columns inside N only (no bias).
fn store_row_beta(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M) { return; }
  for (var j = 0u; j < 4u; j++) {
    if (n + j >= p.N) { return; }
    var x = v[j];
    if (p.beta != 0.0) { x += p.beta * c[m * p.N + n + j]; }
    c[m * p.N + n + j] = x;
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_sum_lr(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  var acc = main_product(tid, lid.x, lid.y, m0, n0);
  acc = product3(acc, tid, lid.x, lid.y, m0, n0, p.K3, p.a3_off);
  if (DIRECT) {
    acc = direct_product4(acc, lid.x, lid.y, m0, n0, p.K4, p.a4_off);
    acc = low_rank_direct(acc * p.alpha, lid.x, lid.y, m0, n0);
    acc = low_rank_direct_term(acc, lid.x, lid.y, m0, n0, p.K2b, p.a2b_off, p.b2b_off, p.alpha2b);
    acc = low_rank_direct_term(acc, lid.x, lid.y, m0, n0, p.K2c, p.a2c_off, p.b2c_off, p.alpha2c);
  } else {
    for (var k0 = 0u; k0 < p.K4; k0 += TK) {
      stage_a3(tid, m0, k0, p.K4, p.a4_off);
      stage_w4(tid, n0, k0, p.K4);
      workgroupBarrier();
      acc = multiply_tile(acc, lid.x, lid.y);
      workgroupBarrier();
    }
    acc = low_rank_product(acc * p.alpha, tid, lid.x, lid.y, m0, n0);
    for (var k0 = 0u; k0 < p.K2b; k0 += TK) {
      stage_lr2(tid, m0, n0, k0);
      workgroupBarrier();
      acc = multiply_tile(acc, lid.x, lid.y);
      workgroupBarrier();
    }
    for (var k0 = 0u; k0 < p.K2c; k0 += TK) {
      stage_lr3(tid, m0, n0, k0);
      workgroupBarrier();
      acc = multiply_tile(acc, lid.x, lid.y);
      workgroupBarrier();
    }
  }
  let m = m0 + lid.y * 4u;
  let n = n0 + lid.x * 4u;
  store_row_beta(m + 0u, n, acc[0]);
  store_row_beta(m + 1u, n, acc[1]);
  store_row_beta(m + 2u, n, acc[2]);
  store_row_beta(m + 3u, n, acc[3]);
}

// gate, up and silu(gate)·up at C[m][n..n+3], the columns inside N only.
fn store_glu(m: u32, n: u32, gate: vec4<f32>, up: vec4<f32>) {
  if (m >= p.M) { return; }
  let base = m * p.N + n;
  let y = silu_mul(gate, up);
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) {
      c[base + j] = gate[j];
      up_out[base + j] = up[j];
      act_out[base + j] = y[j];
    }
  }
}

// pair_products' A·Wᵀ and A·W3ᵀ without tiles (DIRECT; both pairs are TRANS_W only): each step of
// four k reads A once.
fn direct_pair(tx: u32, ty: u32, m0: u32, n0: u32) -> array<mat4x4<f32>, 2> {
  var first = mat4x4<f32>();
  var second = mat4x4<f32>();
  let m = m0 + ty * 4u;
  let n = n0 + tx * 4u;
  for (var k = 0u; k < p.K; k += 4u) {
    let a0 = a_chunk(m, k);
    let a1 = a_chunk(m + 1u, k);
    let a2v = a_chunk(m + 2u, k);
    let a3 = a_chunk(m + 3u, k);
    first = block_step(first, a0, a1, a2v, a3, w_row(0u, k, n, p.K), w_row(1u, k, n, p.K), w_row(2u, k, n, p.K), w_row(3u, k, n, p.K));
    second = block_step(second, a0, a1, a2v, a3, w3_row(0u, k, n, p.K), w3_row(1u, k, n, p.K), w3_row(2u, k, n, p.K), w3_row(3u, k, n, p.K));
  }
  return array<mat4x4<f32>, 2>(first, second);
}

// The products of A with W and with W3 (each invocation's 4×4 blocks), alpha applied, the
// low-rank term added to the first. Each K step stages A once and W then W3 through the one W tile
// (a second tile would enlarge every matmul entry's workgroup memory).
fn pair_products(lid: vec3<u32>, wid: vec3<u32>) -> array<mat4x4<f32>, 2> {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  if (DIRECT) {
    let r = direct_pair(lid.x, lid.y, m0, n0);
    return array<mat4x4<f32>, 2>(low_rank_direct(r[0] * p.alpha, lid.x, lid.y, m0, n0), r[1] * p.alpha);
  }
  var first = mat4x4<f32>();
  var second = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a(tid, m0, k0, false);
    stage_w(tid, n0, k0, false);
    workgroupBarrier();
    first = multiply_tile(first, lid.x, lid.y);
    workgroupBarrier();
    stage_w3(tid, n0, k0, p.K);
    workgroupBarrier();
    second = multiply_tile(second, lid.x, lid.y);
    workgroupBarrier();
  }
  first = low_rank_product(first * p.alpha, tid, lid.x, lid.y, m0, n0);
  return array<mat4x4<f32>, 2>(first, second * p.alpha);
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_glu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = pair_products(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_glu(m + 0u, n, r[0][0], r[1][0]);
  store_glu(m + 1u, n, r[0][1], r[1][1]);
  store_glu(m + 2u, n, r[0][2], r[1][2]);
  store_glu(m + 3u, n, r[0][3], r[1][3]);
}

// ---- the gated MLP behind its RMSNorm ------------------------------------------------------------
//
// matmul_glu_norm: matmul_glu on RMSNorm(A), the norm computed here instead of in a dispatch of its
// own (rmsnorm.wgsl's forward, Hugging Face's order):
//   rstd[m] = 1 / sqrt(mean_k(A[m,k]²) + NORM_EPS),   staged value (A[m,k]·rstd[m])·g[k]
// so the tiles hold what the norm would have written (its formula and order of multiplication; rstd's
// sum of squares is added in another order, so it can differ in the last bit). Each workgroup first computes rstd
// for its own 4·WG_Y rows (a strided sum of squares per row, then its lanes added in workgroup
// memory); the workgroups of the first column of tiles also store it (the backward reads it).
// The normalized rows are never written: nothing else reads them when gate and up carry no adapter.
// Bindings: matmul_glu's (1 a, 2 w, 6 c, 8 act_out, 11 w3, 12 up_out) and 14 norm_w (g, K f32, read as vec4),
// 15 norm_rstd (M f32, written): 8 storage buffers.
@group(0) @binding(14) var<storage, read> norm_w: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read_write> norm_rstd: array<f32>;

override NORM_EPS: f32 = 1e-6;

var<workgroup> row_ss: array<f32, 4u * WG_X * WG_Y>;
var<workgroup> row_rstd: array<f32, 4u * WG_Y>;

// rstd of rows m0.. (4·WG_Y of them) into row_rstd; stored to norm_rstd too when `store`.
fn norm_rows(tid: u32, m0: u32, store: bool) {
  let rows = 4u * WG_Y;
  let threads = WG_X * WG_Y;
  let lanes = max(1u, threads / rows);  // invocations per row
  let chunks = (p.K + 3u) / 4u;
  for (var row = tid / lanes; row < rows; row += threads / lanes) {
    var s = 0.0;
    for (var q = tid % lanes; q < chunks; q += lanes) {
      let v = a_chunk(m0 + row, q * 4u);
      s += dot(v, v);
    }
    row_ss[row * lanes + tid % lanes] = s;
  }
  workgroupBarrier();
  for (var row = tid; row < rows; row += threads) {
    var s = 0.0;
    for (var l = 0u; l < lanes; l++) { s += row_ss[row * lanes + l]; }
    let r = inverseSqrt(s / f32(p.K) + NORM_EPS);
    row_rstd[row] = r;
    if (store && m0 + row < p.M) { norm_rstd[m0 + row] = r; }
  }
  workgroupBarrier();
}

// g[col..col+3], zero past K (one vec4 load when ALIGNED: K and col multiples of 4).
fn gain4(col: u32) -> vec4<f32> {
  if (ALIGNED) {
    if (col >= p.K) { return vec4<f32>(0.0); }
    return norm_w[col / 4u];
  }
  var g = vec4<f32>(0.0);
  for (var j = 0u; j < 4u; j++) {
    if (col + j < p.K) { g[j] = norm_w[(col + j) / 4u][(col + j) % 4u]; }
  }
  return g;
}

// As stage_a, of the normalized rows.
fn stage_a_norm(tid: u32, m0: u32, k0: u32) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    let row = i / chunks;
    let col = k0 + (i % chunks) * 4u;
    a_tile[row * a_stride() + i % chunks] = vec4<tile_t>(a_chunk(m0 + row, col) * row_rstd[row] * gain4(col));
  }
}

// stage_w's TRANS_W layout of W alone (stage_w names B2 too, which this entry does not bind).
fn stage_w_norm(tid: u32, n0: u32, k0: u32) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_X * chunks; i += WG_X * WG_Y) {
    w_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(w_chunk(n0 + i / chunks, k0 + (i % chunks) * 4u, p.N, p.K));
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_glu_norm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  norm_rows(tid, m0, wid.x == 0u);
  var gate = mat4x4<f32>();
  var up = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a_norm(tid, m0, k0);
    stage_w_norm(tid, n0, k0);
    workgroupBarrier();
    gate = multiply_tile(gate, lid.x, lid.y);
    workgroupBarrier();
    stage_w3(tid, n0, k0, p.K);
    workgroupBarrier();
    up = multiply_tile(up, lid.x, lid.y);
    workgroupBarrier();
  }
  gate *= p.alpha;
  up *= p.alpha;
  let m = m0 + lid.y * 4u;
  let n = n0 + lid.x * 4u;
  store_glu(m + 0u, n, gate[0], up[0]);
  store_glu(m + 1u, n, gate[1], up[1]);
  store_glu(m + 2u, n, gate[2], up[2]);
  store_glu(m + 3u, n, gate[3], up[3]);
}

// matmul_norm_bwd: dx = d_mid·W (W as stored, K×N, the backward's layout) where d_mid, the
// gradient of an RMSNorm's input plus the residual gradient, is formed as A is staged:
//   d_mid[r][k] = d_out[r][k] + rstd_r·g_k·dn[r][k] − x[r][k]·rstd_r³·c_r / K,
//   c_r = Σ_k g_k·dn[r][k]·x[r][k],
// with A = d_out (1), dn the gradient of the norm's output (18), x its input (19), rstd from the
// forward (20) and g its gain (14). Each workgroup first forms c for its rows (as norm_rows forms
// rstd), and the workgroups of the first column of tiles store d_mid (21), which the layers below
// read: the norm's backward costs no dispatch of its own. d_mid must be another buffer than
// d_out, which other workgroups are still reading. No bias, beta or low-rank term. 8 storage
// buffers.
@group(0) @binding(18) var<storage, read> nb_dn: array<vec4<f32>>;
@group(0) @binding(19) var<storage, read> nb_x: array<vec4<f32>>;
@group(0) @binding(20) var<storage, read> nb_rstd: array<f32>;
@group(0) @binding(21) var<storage, read_write> nb_dmid: array<f32>;

var<workgroup> row_coef: array<f32, 4u * WG_Y>;  // rstd_r³·c_r / K

// Four consecutive elements of a row-major M×K operand read as vec4 (dn or x), zero outside.
fn nb_chunk(which: u32, r: u32, col: u32) -> vec4<f32> {
  if (r >= p.M || col >= p.K) { return vec4<f32>(0.0); }
  let e = r * p.K + col;
  if (ALIGNED) {
    if (which == 0u) { return nb_dn[e / 4u]; }
    return nb_x[e / 4u];
  }
  var v = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < p.K) {
      if (which == 0u) { v[i] = nb_dn[(e + i) / 4u][(e + i) % 4u]; } else { v[i] = nb_x[(e + i) / 4u][(e + i) % 4u]; }
    }
  }
  return v;
}

// rstd³·c/K of rows m0.. into row_coef (lanes of a row add their strided sums in row_ss).
fn norm_bwd_rows(tid: u32, m0: u32) {
  let rows = 4u * WG_Y;
  let threads = WG_X * WG_Y;
  let lanes = max(1u, threads / rows);
  let chunks = (p.K + 3u) / 4u;
  for (var row = tid / lanes; row < rows; row += threads / lanes) {
    var s = 0.0;
    for (var q = tid % lanes; q < chunks; q += lanes) {
      let col = q * 4u;
      s += dot(gain4(col) * nb_chunk(0u, m0 + row, col), nb_chunk(1u, m0 + row, col));
    }
    row_ss[row * lanes + tid % lanes] = s;
  }
  workgroupBarrier();
  for (var row = tid; row < rows; row += threads) {
    var s = 0.0;
    for (var l = 0u; l < lanes; l++) { s += row_ss[row * lanes + l]; }
    var coef = 0.0;
    if (m0 + row < p.M) {
      let r = nb_rstd[m0 + row];
      coef = r * r * r * s / f32(p.K);
    }
    row_coef[row] = coef;
  }
  workgroupBarrier();
}

// As stage_a, of d_mid; the first column of tiles also stores it.
fn stage_a_norm_bwd(tid: u32, m0: u32, k0: u32, store: bool) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    let row = i / chunks;
    let m = m0 + row;
    let col = k0 + (i % chunks) * 4u;
    var v = vec4<f32>(0.0);
    if (m < p.M) {
      let rstd = nb_rstd[m];
      v = a_chunk(m, col) + rstd * gain4(col) * nb_chunk(0u, m, col) - nb_chunk(1u, m, col) * row_coef[row];
    }
    a_tile[row * a_stride() + i % chunks] = vec4<tile_t>(v);
    if (store) {
      for (var j = 0u; j < 4u; j++) {
        if (m < p.M && col + j < p.K) { nb_dmid[m * p.K + col + j] = v[j]; }
      }
    }
  }
}

// W alone in the tiles, in either layout (stage_w names B2 too, which these entries do not bind).
fn stage_w_only(tid: u32, n0: u32, k0: u32) {
  if (TRANS_W) {
    let chunks = TK / 4u;
    for (var i = tid; i < 4u * WG_X * chunks; i += WG_X * WG_Y) {
      w_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(w_chunk(n0 + i / chunks, k0 + (i % chunks) * 4u, p.N, p.K));
    }
  } else {
    for (var i = tid; i < TK * WG_X; i += WG_X * WG_Y) {
      let kk = i / WG_X;
      let q = i % WG_X;
      w_tile[kk * WG_X + q] = vec4<tile_t>(w_chunk(k0 + kk, n0 + q * 4u, p.K, p.N));
    }
  }
}

// C[m][n..n+3] = v, the columns inside N only (no bias, no beta).
fn store_row_plain(m: u32, n: u32, v: vec4<f32>) {
  if (m >= p.M) { return; }
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) { c[m * p.N + n + j] = v[j]; }
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_norm_bwd(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  norm_bwd_rows(tid, m0);
  var acc = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a_norm_bwd(tid, m0, k0, wid.x == 0u);
    stage_w_only(tid, n0, k0);
    workgroupBarrier();
    acc = multiply_tile(acc, lid.x, lid.y);
    workgroupBarrier();
  }
  acc = acc * p.alpha;
  let m = m0 + lid.y * 4u;
  let n = n0 + lid.x * 4u;
  store_row_plain(m + 0u, n, acc[0]);
  store_row_plain(m + 1u, n, acc[1]);
  store_row_plain(m + 2u, n, acc[2]);
  store_row_plain(m + 3u, n, acc[3]);
}

// ---- matmul_dlogits: the loss's ∂L/∂H from a chunk of logits -----------------------------------
//   C = alpha·dz·opW(W) + beta·C,   dz[r][k] = (exp(A[r][k] − lse_r) − [ce_start + k = label_r])·coef
// A is a chunk of the LM head's logits (M×K, K vocabulary entries from ce_start), W those rows of
// the LM head (K×N as stored: the backward's layout), labels (23, i32), lse (24) and coef (25,
// element 2: g / divisor, which the loss's forward wrote) as shaders/cross_entropy.wgsl has them;
// a row whose label is -100 or outside [0, ce_vocab) gets dz = 0. dz is formed as A is staged, in
// cross_entropy_bwd_dlogits's order of operations, so the loss's backward needs no dispatch that
// rewrites the logits. No bias or low-rank term. Bindings 1, 2, 6, 23, 24, 25: 6 storage buffers.
@group(0) @binding(23) var<storage, read> ce_labels: array<i32>;
@group(0) @binding(24) var<storage, read> ce_lse: array<f32>;
@group(0) @binding(25) var<storage, read> ce_coef: array<f32>;

fn dz_chunk(r: u32, col: u32) -> vec4<f32> {
  if (r >= p.M || col >= p.K) { return vec4<f32>(0.0); }
  let label = ce_labels[r];
  if (label < 0 || u32(label) >= p.ce_vocab) { return vec4<f32>(0.0); }
  let x = a_chunk(r, col);
  let l = ce_lse[r];
  let coef = ce_coef[2];
  var dz = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < p.K) {
      var v = exp(x[i] - l);
      if (u32(label) == p.ce_start + col + i) { v -= 1.0; }
      dz[i] = v * coef;
    }
  }
  return dz;
}

fn stage_a_dlogits(tid: u32, m0: u32, k0: u32) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    a_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(dz_chunk(m0 + i / chunks, k0 + (i % chunks) * 4u));
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_dlogits(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  var acc = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a_dlogits(tid, m0, k0);
    stage_w_only(tid, n0, k0);
    workgroupBarrier();
    acc = multiply_tile(acc, lid.x, lid.y);
    workgroupBarrier();
  }
  acc = acc * p.alpha;
  let m = m0 + lid.y * 4u;
  let n = n0 + lid.x * 4u;
  store_row_beta(m + 0u, n, acc[0]);
  store_row_beta(m + 1u, n, acc[1]);
  store_row_beta(m + 2u, n, acc[2]);
  store_row_beta(m + 3u, n, acc[3]);
}

// ---- matmul_glu_bwd: the dx of an unadapted gated MLP's gate and up, from ∂L/∂act ----------
//   C = d_gate·opW(W) + d_up·opW(W3),   (d_gate, d_up) = silu·mul's backward of A at (gate, up)
// A is ∂L/∂act (M×K: the down projection's dx), gate (7) and up (8) the forward's projections
// (M×K), W (2) and W3 (11) gate's and up's weights. The nonlinearity's backward is formed as the A
// tiles are staged, once per product (each workgroup along a row of tiles repeats it), so that the
// down projection's dx dispatch is free to take another prologue (matmul_norm_bwd: the next
// layer's input norm). No bias, beta or low-rank term. Bindings 1, 2, 6, 7, 8, 11: 6 storage
// buffers.

// d_gate (which 0) or d_up (1) at A[r][col..col+3], zero outside.
fn glu_grad_chunk(r: u32, col: u32, which: u32) -> vec4<f32> {
  if (r >= p.M || col >= p.K) { return vec4<f32>(0.0); }
  let e = r * p.K + col;
  var g = vec4<f32>(0.0);
  var u = vec4<f32>(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (col + i < p.K) {
      g[i] = gate_in[e + i];
      u[i] = up_in[e + i];
    }
  }
  return silu_mul_grads(a_chunk(r, col), g, u)[which];
}

fn stage_a_glu_bwd(tid: u32, m0: u32, k0: u32, which: u32) {
  let chunks = TK / 4u;
  for (var i = tid; i < 4u * WG_Y * chunks; i += WG_X * WG_Y) {
    a_tile[(i / chunks) * a_stride() + i % chunks] = vec4<tile_t>(glu_grad_chunk(m0 + i / chunks, k0 + (i % chunks) * 4u, which));
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_glu_bwd(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let tid = lid.y * WG_X + lid.x;
  let m0 = wid.y * WG_Y * 4u;
  let n0 = wid.x * WG_X * 4u;
  var acc = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a_glu_bwd(tid, m0, k0, 0u);
    stage_w_only(tid, n0, k0);
    workgroupBarrier();
    acc = multiply_tile(acc, lid.x, lid.y);
    workgroupBarrier();
  }
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a_glu_bwd(tid, m0, k0, 1u);
    stage_w3(tid, n0, k0, p.K);
    workgroupBarrier();
    acc = multiply_tile(acc, lid.x, lid.y);
    workgroupBarrier();
  }
  acc = acc * p.alpha;
  let m = m0 + lid.y * 4u;
  let n = n0 + lid.x * 4u;
  store_row_plain(m + 0u, n, acc[0]);
  store_row_plain(m + 1u, n, acc[1]);
  store_row_plain(m + 2u, n, acc[2]);
  store_row_plain(m + 3u, n, acc[3]);
}

// Two projections of one input at C[m][n..n+3] and up_out[m][n..n+3] (matmul_pair, matvec_pair).
fn store_pair(m: u32, n: u32, first: vec4<f32>, second: vec4<f32>) {
  if (m >= p.M) { return; }
  let base = m * p.N + n;
  for (var j = 0u; j < 4u; j++) {
    if (n + j < p.N) {
      c[base + j] = first[j];
      up_out[base + j] = second[j];
    }
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_pair(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = pair_products(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_pair(m + 0u, n, r[0][0], r[1][0]);
  store_pair(m + 1u, n, r[0][1], r[1][1]);
  store_pair(m + 2u, n, r[0][2], r[1][2]);
  store_pair(m + 3u, n, r[0][3], r[1][3]);
}

// matvec_partial's K loop against W3 (no low-rank term).
fn matvec3_partial(lid: vec3<u32>, wid: vec3<u32>) -> array<vec4<f32>, MV_M> {
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  let r0 = out_col(n0);
  let r1 = out_col(n0 + 1u);
  let r2 = out_col(n0 + 2u);
  let r3 = out_col(n0 + 3u);
  var acc: array<vec4<f32>, MV_M>;
  for (var k = lid.x * 4u; k < p.K; k += MV_K * 4u) {
    let w0 = w3_chunk(r0, k, p.N, p.K);
    let w1 = w3_chunk(r1, k, p.N, p.K);
    let w2 = w3_chunk(r2, k, p.N, p.K);
    let w3v = w3_chunk(r3, k, p.N, p.K);
    for (var m = 0u; m < MV_M; m++) {
      if (m < p.M) {
        let x = a_chunk(m, k);
        acc[m] += vec4<f32>(dot(x, w0), dot(x, w1), dot(x, w2), dot(x, w3v));
      }
    }
  }
  for (var m = 0u; m < MV_M; m++) { acc[m] *= p.alpha; }
  return acc;
}

@compute @workgroup_size(MV_K, MV_N)
fn matvec_glu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let gate = matvec_reduce(matvec_partial(lid, wid), lid);
  let up = matvec_reduce(matvec3_partial(lid, wid), lid);
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  if (MV_K == 1u) {
    for (var m = 0u; m < MV_M; m++) { store_glu(m, n0, gate[m], up[m]); }
  } else if (lid.x < MV_M) {
    store_glu(lid.x, n0, gate[0], up[0]);
  }
}

@compute @workgroup_size(MV_K, MV_N)
fn matvec_pair(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let first = matvec_reduce(matvec_partial(lid, wid), lid);
  let second = matvec_reduce(matvec3_partial(lid, wid), lid);
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  if (MV_K == 1u) {
    for (var m = 0u; m < MV_M; m++) { store_pair(m, n0, first[m], second[m]); }
  } else if (lid.x < MV_M) {
    store_pair(lid.x, n0, first[0], second[0]);
  }
}

// ---- the pairs with the RoPE epilogue ------------------------------------------------------------
//
// matmul_pair_rope, matvec_pair_rope: matmul_pair and matvec_pair with ROPE != 0 (binding 13
// besides theirs): both outputs at columns out_col(n..n+3), each rotated where its bit is set (v
// beside k keeps its values, only their order of computation moves).

fn store_pair_rope(m: u32, n: u32, first: vec4<f32>, second: vec4<f32>) {
  if (m >= p.M || n >= p.N) { return; }
  var x = first;
  var y = second;
  let f = rope_factors(m, n);  // once for both outputs
  if ((ROPE & 1u) != 0u) { x = rope_apply(f, x); }
  if ((ROPE & 2u) != 0u) { y = rope_apply(f, y); }
  for (var j = 0u; j < 4u; j++) {
    c[m * p.N + out_col(n + j)] = x[j];
    up_out[m * p.N + out_col(n + j)] = y[j];
  }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_pair_rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let r = pair_products(lid, wid);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let n = wid.x * WG_X * 4u + lid.x * 4u;
  store_pair_rope(m + 0u, n, r[0][0], r[1][0]);
  store_pair_rope(m + 1u, n, r[0][1], r[1][1]);
  store_pair_rope(m + 2u, n, r[0][2], r[1][2]);
  store_pair_rope(m + 3u, n, r[0][3], r[1][3]);
}

@compute @workgroup_size(MV_K, MV_N)
fn matvec_pair_rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let first = matvec_reduce(matvec_partial(lid, wid), lid);
  let second = matvec_reduce(matvec3_partial(lid, wid), lid);
  let n0 = (wid.x * MV_N + lid.y) * 4u;
  if (MV_K == 1u) {
    for (var m = 0u; m < MV_M; m++) { store_pair_rope(m, n0, first[m], second[m]); }
  } else if (lid.x < MV_M) {
    store_pair_rope(lid.x, n0, first[0], second[0]);
  }
}

// ---- matmul_qkv: the attention block's q, k and v projections in one dispatch -------------------
//
// q = A·Wᵀ (W: N×K), k = A·W3ᵀ (qkv_nk×K) and v = A·W4ᵀ (qkv_nv×K), each with its own storage
// format, as column segments of one grid: the first N / TN column tiles (TN = 4·WG_X) compute q,
// the next qkv_nk / TN k, the last qkv_nv / TN v. matmul.ts requires every width a whole number of
// tiles and k's and v's no wider than q's, so each workgroup computes one projection and the
// staging functions' bound p.N (q's width) never cuts a row of k or v. Each may add a LoRA term
// (qkv_lr): the first term's operands (K2, a2_off, b2_off, alpha2), the second's (K2b, a2b_off,
// b2b_off, alpha2b) or the third's (K2c, a2c_off, b2c_off, alpha2c), their h places of one buffer
// (4 a2) and their B of another (5 b2), as matmul_sum_lr binds them. q, k and v are places of one buffer (6 c, at qkv_q_off,
// qkv_k_off, qkv_v_off), row-major at their own widths. matmul_qkv_rope (ROPE != 0): bit 0 rotates
// q, bit 1 k (whose columns, like v's, are then computed in out_col's order). No bias or beta. With f16 tiles (LR_DIRECT) the
// LoRA terms are read and multiplied in f32, not staged. Bindings 1 a, 2 w, 4 a2, 5 b2, 6 c, 11 w3, 22 w4, and 13 rope_freq: up to 8 storage buffers.

// Which projection column tile x belongs to (0 q, 1 k, 2 v), and its first column there.
fn qkv_segment(x: u32) -> vec2<u32> {
  let tn = 4u * WG_X;
  let tq = p.N / tn;
  let tk = p.qkv_nk / tn;
  if (x < tq) { return vec2<u32>(0u, x * tn); }
  if (x < tq + tk) { return vec2<u32>(1u, (x - tq) * tn); }
  return vec2<u32>(2u, (x - tq - tk) * tn);
}

// This invocation's 4×4 block of projection `seg`, alpha and its low-rank term applied. `seg` is
// the same for the whole workgroup, so the barriers inside its branches are reached uniformly.
fn qkv_product(seg: u32, tid: u32, tx: u32, ty: u32, m0: u32, n0: u32) -> mat4x4<f32> {
  var acc = mat4x4<f32>();
  for (var k0 = 0u; k0 < p.K; k0 += TK) {
    stage_a(tid, m0, k0, false);
    if (seg == 0u) {
      stage_w(tid, n0, k0, false);
    } else if (seg == 1u) {
      stage_w3(tid, n0, k0, p.K);
    } else {
      stage_w4(tid, n0, k0, p.K);
    }
    workgroupBarrier();
    acc = multiply_tile(acc, tx, ty);
    workgroupBarrier();
  }
  acc = acc * p.alpha;
  // The projection's low-rank term: the first, second or third term's operands (rank 0: none).
  let lr = (p.qkv_lr >> (2u * seg)) & 3u;
  var term = vec3<u32>(0u);  // rank, A2's offset, B2's offset
  var alpha2 = 0.0;
  if (lr == 1u) {
    term = vec3<u32>(p.K2, p.a2_off, p.b2_off);
    alpha2 = p.alpha2;
  } else if (lr == 2u) {
    term = vec3<u32>(p.K2b, p.a2b_off, p.b2b_off);
    alpha2 = p.alpha2b;
  } else if (lr == 3u) {
    term = vec3<u32>(p.K2c, p.a2c_off, p.b2c_off);
    alpha2 = p.alpha2c;
  }
  // With f16 tiles (LR_DIRECT) the term is read and multiplied in f32, as low_rank_direct does.
  if (LR_DIRECT) { return low_rank_direct_term(acc, tx, ty, m0, n0, term.x, term.y, term.z, alpha2); }
  for (var k0 = 0u; k0 < term.x; k0 += TK) {
    stage_lr_term(tid, m0, n0, k0, term.x, term.y, term.z, alpha2);
    workgroupBarrier();
    acc = multiply_tile(acc, tx, ty);
    workgroupBarrier();
  }
  return acc;
}

// Projection seg's width and where it starts in C.
fn qkv_place(seg: u32) -> vec2<u32> {
  if (seg == 1u) { return vec2<u32>(p.qkv_nk, p.qkv_k_off); }
  if (seg == 2u) { return vec2<u32>(p.qkv_nv, p.qkv_v_off); }
  return vec2<u32>(p.N, p.qkv_q_off);
}

// Projection seg's row m, columns n..n+3, at its place in C.
fn store_qkv(seg: u32, m: u32, n: u32, v: vec4<f32>) {
  let place = qkv_place(seg);
  if (m >= p.M || n >= place.x) { return; }
  for (var j = 0u; j < 4u; j++) { c[place.y + m * place.x + n + j] = v[j]; }
}

// As store_qkv at columns out_col(n..n+3), rotated where ROPE's bit for seg is set.
fn store_qkv_rope(seg: u32, m: u32, n: u32, v: vec4<f32>) {
  let place = qkv_place(seg);
  if (m >= p.M || n >= place.x) { return; }
  var x = v;
  if (((ROPE >> seg) & 1u) != 0u) { x = rope_rotate(m, n, x); }
  for (var j = 0u; j < 4u; j++) { c[place.y + m * place.x + out_col(n + j)] = x[j]; }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_qkv(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let s = qkv_segment(wid.x);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let acc = qkv_product(s.x, lid.y * WG_X + lid.x, lid.x, lid.y, wid.y * WG_Y * 4u, s.y);
  let n = s.y + lid.x * 4u;
  store_qkv(s.x, m + 0u, n, acc[0]);
  store_qkv(s.x, m + 1u, n, acc[1]);
  store_qkv(s.x, m + 2u, n, acc[2]);
  store_qkv(s.x, m + 3u, n, acc[3]);
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_qkv_rope(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let s = qkv_segment(wid.x);
  let m = wid.y * WG_Y * 4u + lid.y * 4u;
  let acc = qkv_product(s.x, lid.y * WG_X + lid.x, lid.x, lid.y, wid.y * WG_Y * 4u, s.y);
  let n = s.y + lid.x * 4u;
  store_qkv_rope(s.x, m + 0u, n, acc[0]);
  store_qkv_rope(s.x, m + 1u, n, acc[1]);
  store_qkv_rope(s.x, m + 2u, n, acc[2]);
  store_qkv_rope(s.x, m + 3u, n, acc[3]);
}
