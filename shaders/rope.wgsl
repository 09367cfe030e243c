// rope.wgsl: rotary position embedding, Hugging Face's rotate_half convention, in place.
//
// x holds rows = B·T rows of row_stride elements; from column col_offset on, n_heads heads of
// head_dim = 2·half each. Within a head, element i pairs with i + half (i < half):
//   θ      = f32(pos) · inv_freq[i]         (rounded to f32 once, as HF's f32 matmul does)
//   c, s   = scaling · cos θ, scaling · sin θ  (scaling: HF's attention_scaling, 1 for default/llama3)
//   rope_fwd:  x[i] ← x[i]·c − x[i+half]·s,   x[i+half] ← x[i+half]·c + x[i]·s
//   rope_bwd:  the transpose, applied to the gradient:
//              dx[i] ← dx[i]·c + dx[i+half]·s, dx[i+half] ← dx[i+half]·c − dx[i]·s
// pos = pos0 + (row % T), or positions[row] when p.has_positions != 0 (packed sequences, decoding).
// q and k adjacent in a fused buffer are one call: n_heads = heads of q + heads of k. q and k in
// separate buffers are one call too: x2 holds n_heads2 more heads per row, packed (row stride
// n_heads2·head_dim), taking head indices n_heads.. of the same grid.
// Nothing is saved for the backward (it recomputes θ); there are no parameters to train.
//
// cos and sin (cos_sin, in shaders/rope_math.wgsl, which rope.ts puts in front; the attention
// backward's RoPE uses it too) are not WGSL's builtins, whose accuracy WGSL leaves loose (2^-11 absolute inside
// [-π, π], unspecified outside), while θ reaches 10^5 at long positions. θ is reduced by π/2 in
// f32 with a four-part Cody–Waite constant (the first three parts have 7 significant bits, so
// k·part is exact for |k| < 2^17, i.e. |θ| < 2·10^5), then sin/cos of the remainder in
// [-π/4, π/4] come from Taylor polynomials (error below 1e-9). This follows the f32 cos/sin of
// PyTorch to a few ulp for any position a model uses.
//
// Bindings, group 0:
//   0 p          uniform Params
//   1 inv_freq   [half] f32 (read)
//   2 positions  [rows] i32 (read; only when p.has_positions != 0)
//   3 x          [rows, row_stride] f32 (read and written in place)
//   4 x2         [rows, n_heads2·head_dim] f32 (read and written in place; only when n_heads2 > 0)
// One invocation per (row, head, i) pair, on a 2-D grid (index gid.y·grid_stride + gid.x).
//
// rope_fwd_cache (decoding): the same rotation of q (x, in place) and k (x2), but k's rotated heads
// go to row positions[row] of a KV cache instead, and the same elements of v are copied to the v
// cache's row, so the new token's keys and values cost no copy dispatches. Bindings 0..4 as above
// (x2 only read), 5 v [rows, n_heads2·head_dim] (read), 6 k_cache, 7 v_cache [max rows,
// n_heads2·head_dim] (written; positions[row] < max rows is checked by the host for the largest
// position it plans for).

struct Params {
  pairs: u32,        // rows · (n_heads + n_heads2) · half
  half: u32,
  n_heads: u32,
  T: u32,
  pos0: u32,
  row_stride: u32,
  col_offset: u32,
  scaling: f32,
  has_positions: u32,
  grid_stride: u32,  // invocations per row of the dispatch grid
  n_heads2: u32,     // heads of x2 (0: x alone)
  _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> x2: array<f32>;
@group(0) @binding(5) var<storage, read> v_new: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<f32>;

override WG: u32 = 256;

// Pair `idx` of the grid: element i (and i + half) of head `head` in row `row`, heads of x first,
// then x2's; and its (scaling·cos θ, scaling·sin θ).
struct Pair {
  i: u32,
  head: u32,
  row: u32,
  cs: vec2<f32>,
}

fn pair_at(idx: u32) -> Pair {
  let i = idx % p.half;
  let head_row = idx / p.half;
  let heads = p.n_heads + p.n_heads2;
  let row = head_row / heads;
  var pos: f32;
  if (p.has_positions != 0u) {
    pos = f32(positions[row]);
  } else {
    pos = f32(p.pos0 + row % p.T);
  }
  return Pair(i, head_row % heads, row, cos_sin(pos * inv_freq[i]) * p.scaling);
}

// Rotates pair q of x (one of its n_heads heads) in place; s is ±sin θ (the backward's transpose).
fn rotate_x(q: Pair, s: f32) {
  let i1 = q.row * p.row_stride + p.col_offset + q.head * 2u * p.half + q.i;
  let i2 = i1 + p.half;
  let a = x[i1];
  let b = x[i2];
  x[i1] = a * q.cs.x - b * s;
  x[i2] = b * q.cs.x + a * s;
}

// Where pair q of x2 (head q.head − n_heads of its packed rows) starts within a row of x2.
fn x2_within(q: Pair) -> u32 {
  return (q.head - p.n_heads) * 2u * p.half + q.i;
}

fn rotate(gid: vec3<u32>, direction: f32) {
  let idx = gid.y * p.grid_stride + gid.x;
  if (idx >= p.pairs) { return; }
  let q = pair_at(idx);
  let s = direction * q.cs.y;
  if (q.head < p.n_heads) {
    rotate_x(q, s);
  } else {
    let i1 = q.row * p.n_heads2 * 2u * p.half + x2_within(q);
    let i2 = i1 + p.half;
    let a = x2[i1];
    let b = x2[i2];
    x2[i1] = a * q.cs.x - b * s;
    x2[i2] = b * q.cs.x + a * s;
  }
}

@compute @workgroup_size(WG)
fn rope_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  rotate(gid, 1.0);
}

@compute @workgroup_size(WG)
fn rope_bwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  rotate(gid, -1.0);
}

@compute @workgroup_size(WG)
fn rope_fwd_cache(@builtin(global_invocation_id) gid: vec3<u32>) {
  let idx = gid.y * p.grid_stride + gid.x;
  if (idx >= p.pairs) { return; }
  let q = pair_at(idx);
  if (q.head < p.n_heads) {
    rotate_x(q, q.cs.y);
  } else {
    // k's rotated pair goes to the cache row of its position, v's pair is copied beside it.
    let width = p.n_heads2 * 2u * p.half;
    let i1 = q.row * width + x2_within(q);
    let i2 = i1 + p.half;
    let o1 = u32(max(positions[q.row], 0)) * width + x2_within(q);
    let o2 = o1 + p.half;
    let a = x2[i1];
    let b = x2[i2];
    k_cache[o1] = a * q.cs.x - b * q.cs.y;
    k_cache[o2] = b * q.cs.x + a * q.cs.y;
    v_cache[o1] = v_new[i1];
    v_cache[o2] = v_new[i2];
  }
}
