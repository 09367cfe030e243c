// embedding.wgsl: token embedding gather, with GPT-2's learned position embedding added.
//
//   out[t, c] = E[ids[t], c] (+ wpe[pos_t, c] when p.has_wpe != 0)
//   pos_t     = pos0 + (t % T), or positions[t] when p.has_positions != 0
//
// Forward only: the embedding tables are frozen and LoRA on embeddings is out of scope, so there
// is no backward and nothing is saved. out is written.
//
// Out-of-range input never reads out of bounds. When ids[t] is outside [0, vocab), or (with wpe)
// pos_t is outside [0, max_pos), row t of out is written as zeros and the error buffer records it:
//   errors[0] |= 1 (a token id was out of range), |= 2 (a position was out of range)
//   errors[1] += 1 per zeroed row
// The kernel never clears errors: the host clears it (to zeros) and reads it back when it likes.
// The host validates ids before upload, so a nonzero errors[0] means a bug upstream.
//
// A table too large for one binding comes in parts of whole rows (core's table.ts), one dispatch
// per part: `table` then holds rows [p.row0, p.row0 + p.part_rows) of E, a dispatch writes only the
// rows of out whose id falls in its part, and only the part with row0 = 0 zeroes and records the
// invalid ones. A whole table is the part with row0 = 0 and part_rows = vocab.
//
// Bindings, group 0:
//   0 p          uniform Params
//   1 ids        [rows] i32 (read), rows = B·T
//   2 table      E [part_rows, d] (rows row0.. of E [vocab, d]): f32 (embedding_fwd) or f16 packed two
//                per u32 (embedding_fwd_f16)
//   3 wpe        [max_pos, d], same dtype as E (read only when p.has_wpe != 0)
//   4 positions  [rows] i32 (read only when p.has_positions != 0)
//   5 out        [rows, d] f32 (written)
//   6 errors     [2] u32, atomic (accumulated)
// One invocation per output element, on a 2-D grid (index gid.y·grid_stride + gid.x).

struct Params {
  n: u32,            // rows · d
  d: u32,
  vocab: u32,
  max_pos: u32,
  T: u32,
  pos0: u32,
  has_wpe: u32,
  has_positions: u32,
  grid_stride: u32,  // invocations per row of the dispatch grid
  row0: u32,         // the first row of E in `table`
  part_rows: u32,    // rows of E in `table`
  _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> table_h: array<u32>;
@group(0) @binding(3) var<storage, read> wpe: array<f32>;
@group(0) @binding(3) var<storage, read> wpe_h: array<u32>;
@group(0) @binding(4) var<storage, read> positions: array<i32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> errors: array<atomic<u32>>;

override WG: u32 = 256;

struct Lookup {
  row: u32,       // index into the table (this part's rows)
  pos: u32,       // index into wpe
  col: u32,
  valid: bool,
}

// Resolves element i of out; zeroes it and records the error when an index is out of range.
fn lookup(gid: vec3<u32>) -> Lookup {
  let i = gid.y * p.grid_stride + gid.x;
  let t = i / p.d;
  let col = i % p.d;
  let id = ids[t];
  var pos = i32(p.pos0 + t % p.T);
  if (p.has_positions != 0u) { pos = positions[t]; }
  var flags = 0u;
  if (id < 0 || u32(id) >= p.vocab) { flags |= 1u; }
  if (p.has_wpe != 0u && (pos < 0 || u32(pos) >= p.max_pos)) { flags |= 2u; }
  if (flags != 0u) {
    if (p.row0 == 0u) {
      out[i] = 0.0;
      if (col == 0u) {
        atomicOr(&errors[0], flags);
        atomicAdd(&errors[1], 1u);
      }
    }
    return Lookup(0u, 0u, col, false);
  }
  // Another part's row: that part's dispatch writes it.
  if (u32(id) < p.row0 || u32(id) - p.row0 >= p.part_rows) { return Lookup(0u, 0u, col, false); }
  return Lookup(u32(id) - p.row0, u32(max(pos, 0)), col, true);
}

@compute @workgroup_size(WG)
fn embedding_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.y * p.grid_stride + gid.x >= p.n) { return; }
  let l = lookup(gid);
  if (!l.valid) { return; }
  var v = table[l.row * p.d + l.col];
  if (p.has_wpe != 0u) { v += wpe[l.pos * p.d + l.col]; }
  out[gid.y * p.grid_stride + gid.x] = v;
}

fn half_at_table(idx: u32) -> f32 {
  return unpack2x16float(table_h[idx / 2u])[idx % 2u];
}

fn half_at_wpe(idx: u32) -> f32 {
  return unpack2x16float(wpe_h[idx / 2u])[idx % 2u];
}

@compute @workgroup_size(WG)
fn embedding_fwd_f16(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.y * p.grid_stride + gid.x >= p.n) { return; }
  let l = lookup(gid);
  if (!l.valid) { return; }
  var v = half_at_table(l.row * p.d + l.col);
  if (p.has_wpe != 0u) { v += half_at_wpe(l.pos * p.d + l.col); }
  out[gid.y * p.grid_stride + gid.x] = v;
}
