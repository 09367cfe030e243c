// cross_entropy.wgsl: the causal language-model loss, computed over vocabulary chunks so that the
// rows × V logits never exist at once (Hugging Face's ForCausalLMLoss after the label shift).
//
// For hidden states H [rows, d] (the final norm's output), the LM head E [V, d] (frozen) and
// labels [rows] (already shifted; -100 = ignored):
//
//   z[i, v]    = H[i]·E[v]                          (the logits; never all held at once)
//   lse[i]     = log Σ_v exp z[i, v]
//   loss_i     = lse[i] − z[i, label_i]             (0 where label_i = -100 or out of range)
//   count      = #{i : 0 ≤ label_i < V}
//   loss       = Σ_i loss_i / divisor,   divisor = count, or a host value (gradient accumulation:
//                the total count of every micro-batch); a divisor of 0 gives loss 0, not NaN
//   backward, given g = ∂L/∂loss:
//   dz[i, v]   = (exp(z[i, v] − lse[i]) − [v = label_i]) · g / divisor   (0 for ignored rows)
//   dH[i]      = Σ_v dz[i, v] · E[v]                (E gets no gradient)
//
// The host cuts the vocabulary into chunks [start, start + count) and, per chunk, has the LM head
// matmul (shaders/matmul.wgsl, W = rows [start, start + count) of E) write logits [rows, count] into
// one scratch buffer reused by every chunk. The entry points here work on that scratch:
//
//   cross_entropy_fwd_chunk    one workgroup per row: the chunk's max and Σ exp (each invocation
//                              keeps an online max/sum over a strided slice; merge_workgroup
//                              merges them), merged into the row's running (max, sum)
//                              (written on the first chunk, p.first != 0); picks z[i, label_i]
//                              when the label falls in the chunk.
//   cross_entropy_fwd_finish   one workgroup for all rows: lse, per-row loss, the total and the
//                              count (a group sum), the loss; flags bad labels.
//   cross_entropy_bwd_scale    one workgroup: counts the labelled rows (a backward planned apart
//                              from the forward).
//   cross_entropy_bwd_dlogits  one invocation per element of the chunk: logits → dz in place,
//                              with coefficient g / divisor (the host's divisor, or the count).
//                              The host then runs dH (+)= dz · E[start : start + count].
// In training (forward and backward planned together) neither runs: the finish writes g / divisor
// to loss[2] (has_coef), and each dH matmul forms dz as it stages the logits (matmul_dlogits in
// shaders/matmul.wgsl, in cross_entropy_bwd_dlogits's order of operations).
//   cross_entropy_gather_rows  one invocation per element: out[j] = H[index[j]] (the rows whose
//                              logits generation wants).
//
// Labels other than -100 outside [0, V) are never used as an index: such a row counts as ignored
// (no loss, no gradient) and the forward records it in the error buffer:
//   errors[0] |= 1 (a label was out of range), errors[1] += 1 per such row.
// cross_entropy_gather_rows zeroes a row whose index is outside [0, rows) and records
//   errors[0] |= 2, errors[1] += 1 per such row.
// No kernel clears errors: the host clears it and reads it back when it likes.
//
// Bindings, group 0 (binding 0 is always p):
//   fwd_chunk    1 labels [rows] i32 (read), 2 logits [rows, count] (read),
//                3 stats [rows] vec4 (.x running max, .y running Σ exp, .z z[i, label_i], .w 1 once
//                  a NaN or +Inf logit was seen; scratch, written on the first chunk, then read
//                  and written)
//   fwd_finish   1 labels, 2 stats (read), 3 lse [rows] (written; saved for the backward),
//                4 row_loss [rows] (written when p.has_row_loss != 0), 5 loss [≥ 2] (written:
//                loss[0] = the loss, loss[1] = count; with p.has_coef, [≥ 3] and loss[2] = g /
//                divisor, what the training backward's matmul_dlogits in shaders/matmul.wgsl
//                multiplies dz by), 6 errors [2] u32 atomic (accumulated)
//   fwd_finish_scaled  as fwd_finish, and 7 loss_scale [≥ 1] (read: S in element 0), by which
//                loss[2] is multiplied
//   bwd_scale    1 labels, 2 coef [2] (written: coef[1] = count)
//   bwd_dlogits  1 labels, 2 lse [rows] (read), 3 coef [2] (read: coef[1] = count; the forward's
//                loss output in training, [3] with p.has_coef, whose coef[2] it multiplies dz
//                by), 4 logits [rows, count] (read, then written with dz)
//   gather_rows  1 index [n] i32 (read), 2 h [rows, d] (read), 3 out [n, d] (written),
//                4 errors [2] u32 atomic (accumulated)
// Every buffer is f32 unless said otherwise. All arithmetic is f32.
//
// NaN and +Inf logits. WGSL lets an implementation assume that no NaN or infinity occurs, and
// some do: on SwiftShader a NaN logit came out of the running sum as a finite lse (about 92). The
// divergence check reads the loss, so a bad logit is found by its bits instead (nonfinite, which
// no such assumption can remove), carried in stats .w, and the finish stores the NaN bit pattern
// (no arithmetic on it) as that row's lse and row loss and as the loss. −Inf stays as it was: it
// contributes exp(−Inf) = 0 like a masked entry.

struct Params {
  rows: u32,
  vocab: u32,
  start: u32,         // first vocabulary entry of this chunk
  count: u32,         // entries in this chunk: the row length of the logits scratch
  first: u32,         // fwd_chunk: 1 on the first chunk (stats are written, not merged)
  has_divisor: u32,
  divisor: f32,
  g: f32,
  has_row_loss: u32,
  grid_x: u32,        // workgroups (fwd_chunk) or invocations (elementwise kernels) per grid row
  d: u32,             // gather_rows: row length of h
  n: u32,             // gather_rows: rows gathered
  has_coef: u32,      // fwd_finish: also write the backward's coefficient g / divisor to loss[2];
                      // bwd_dlogits: read it from coef[2]
}

@group(0) @binding(0) var<uniform> p: Params;

@group(0) @binding(1) var<storage, read> labels: array<i32>;
@group(0) @binding(1) var<storage, read> index: array<i32>;

@group(0) @binding(2) var<storage, read> chunk_logits: array<f32>;
@group(0) @binding(2) var<storage, read> stats_in: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> coef_out: array<f32>;
@group(0) @binding(2) var<storage, read> lse_in: array<f32>;
@group(0) @binding(2) var<storage, read> h: array<f32>;

@group(0) @binding(3) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read> coef: array<f32>;
@group(0) @binding(3) var<storage, read_write> rows_out: array<f32>;

@group(0) @binding(4) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> gather_errors: array<atomic<u32>>;

@group(0) @binding(5) var<storage, read_write> loss: array<f32>;

@group(0) @binding(6) var<storage, read_write> errors: array<atomic<u32>>;

@group(0) @binding(7) var<storage, read> loss_scale: array<f32>;

override WG: u32 = 256;   // invocations per workgroup; a power of two

const IGNORE_INDEX: i32 = -100;
const LABEL_OUT_OF_RANGE: u32 = 1u;
const ROW_OUT_OF_RANGE: u32 = 2u;
// Start of a running max: the lowest finite f32 (WGSL has no -inf literal). exp(LOWEST − x) is 0
// for any logit x, and a slot that saw no logit keeps a sum of 0, so merging it changes nothing.
const LOWEST: f32 = -0x1.fffffep+127f;

// A quiet NaN, made at run time (a constant expression that is NaN does not compile).
fn quiet_nan() -> f32 {
  var bits = 0x7fc00000u;
  return bitcast<f32>(bits);
}

fn counted(label: i32) -> bool {
  return label >= 0 && u32(label) < p.vocab;
}

// NaN or +Inf, from the bits (see the header); −Inf is not.
fn nonfinite(x: f32) -> bool {
  let b = bitcast<u32>(x);
  return (b & 0x7f800000u) == 0x7f800000u && b != 0xff800000u;
}

// (max, Σ exp(· − max)) of the union of two sets given as (ma, sa) and (mb, sb).
fn merge(ma: f32, sa: f32, mb: f32, sb: f32) -> vec2<f32> {
  let m = max(ma, mb);
  return vec2<f32>(m, sa * exp(ma - m) + sb * exp(mb - m));
}

// (max, Σ exp(· − max)) over the workgroup, from each invocation's (m, s): the maximum first, then
// every s rescaled to it and added (group_max, group_sum: group_reduce.wgsl or its subgroup twin,
// put first by cross_entropy.ts). NaN is not relied on here (see the header): fwd_chunk flags
// non-finite logits by their bits.
// `bad` (0 or 1) is summed beside s at no extra barrier: the third value is nonzero when any
// invocation saw a non-finite logit.
fn merge_workgroup(tid: u32, m: f32, s: f32, bad: f32) -> vec3<f32> {
  let mt = group_max(tid, WG, m);
  let sums = group_sum2(tid, WG, vec2<f32>(s * exp(m - mt), bad));
  return vec3<f32>(mt, sums.x, sums.y);
}

@compute @workgroup_size(WG)
fn cross_entropy_fwd_chunk(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let row = wid.y * p.grid_x + wid.x;
  if (row >= p.rows) { return; }
  let base = row * p.count;
  var m = LOWEST;
  var s = 0.0;
  var bad = 0.0;
  for (var j = tid; j < p.count; j += WG) {
    let x = chunk_logits[base + j];
    if (nonfinite(x)) { bad = 1.0; }
    // One exp per logit. (A NaN logit would go to the second branch, but what the arithmetic then
    // makes of it is not promised: the bit test above flags it.)
    if (x > m) {
      s = s * exp(m - x) + 1.0;
      m = x;
    } else {
      s += exp(x - m);
    }
  }
  let merged = merge_workgroup(tid, m, s, bad);
  let chunk = merged.xy;
  let chunk_bad = select(0.0, 1.0, merged.z != 0.0);
  if (tid == 0u) {
    var st = stats[row];
    if (p.first != 0u) {
      st = vec4<f32>(chunk.x, chunk.y, 0.0, chunk_bad);
    } else {
      let r = merge(st.x, st.y, chunk.x, chunk.y);
      st.x = r.x;
      st.y = r.y;
      st.w = max(st.w, chunk_bad);
    }
    let label = labels[row];
    if (label >= i32(p.start) && label < i32(p.start + p.count)) {
      st.z = chunk_logits[base + u32(label) - p.start];
    }
    stats[row] = st;
  }
}

@compute @workgroup_size(WG)
fn cross_entropy_fwd_finish(@builtin(local_invocation_index) tid: u32) {
  finish(tid, 1.0);
}

// The finish of a training step whose backward carries a loss scale S (loss_scale.wgsl): the
// coefficient it leaves in loss[2] is (g / divisor)·S, S a power of two, so every gradient of the
// backward is S times the unscaled one, bit for bit until something overflows. The loss is not
// scaled.
@compute @workgroup_size(WG)
fn cross_entropy_fwd_finish_scaled(@builtin(local_invocation_index) tid: u32) {
  finish(tid, loss_scale[0]);
}

fn finish(tid: u32, scale: f32) {
  var sum = 0.0;
  var n = 0u;
  var bad = 0.0;  // 1 once a counted row saw a NaN or +Inf logit
  for (var i = tid; i < p.rows; i += WG) {
    let st = stats_in[i];
    let row_bad = st.w != 0.0;
    var l = st.x + log(st.y);
    if (row_bad) { l = quiet_nan(); }
    lse[i] = l;
    let label = labels[i];
    var rl = 0.0;
    if (counted(label)) {
      n += 1u;
      if (row_bad) {
        rl = l;
        bad = 1.0;
      } else {
        rl = l - st.z;
        sum += rl;
      }
    } else if (label != IGNORE_INDEX) {
      atomicOr(&errors[0], LABEL_OUT_OF_RANGE);
      atomicAdd(&errors[1], 1u);
    }
    if (p.has_row_loss != 0u) { row_loss[i] = rl; }
  }
  // The count in f32 is exact up to 2^24 rows.
  let totals = group_sum2(tid, WG, vec2<f32>(sum, f32(n)));
  let any_bad = group_max(tid, WG, bad);
  if (tid == 0u) {
    let total = totals.y;
    let divisor = select(total, p.divisor, p.has_divisor != 0u);
    loss[0] = select(0.0, totals.x / divisor, divisor > 0.0);
    if (any_bad != 0.0) { loss[0] = quiet_nan(); }
    loss[1] = total;
    if (p.has_coef != 0u) { loss[2] = select(0.0, p.g / divisor, divisor > 0.0) * scale; }
  }
}

@compute @workgroup_size(WG)
fn cross_entropy_bwd_scale(@builtin(local_invocation_index) tid: u32) {
  var n = 0u;
  for (var i = tid; i < p.rows; i += WG) {
    if (counted(labels[i])) { n += 1u; }
  }
  let total = group_sum(tid, WG, f32(n));
  if (tid == 0u) { coef_out[1] = total; }
}

// dz's coefficient g / divisor (0 for a divisor of 0), the divisor being the host's or the count
// in coef[1] (the forward's loss output in training, else cross_entropy_bwd_scale's). In training
// (p.has_coef) the forward's finish left it in coef[2], loss-scaled where the step is, and it is
// taken from there: the same f32 value where nothing scales it.
fn dz_coef() -> f32 {
  if (p.has_coef != 0u) { return coef[2]; }
  let divisor = select(coef[1], p.divisor, p.has_divisor != 0u);
  return select(0.0, p.g / divisor, divisor > 0.0);
}

@compute @workgroup_size(WG)
fn cross_entropy_bwd_dlogits(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * p.grid_x + gid.x;
  if (i >= p.rows * p.count) { return; }
  let row = i / p.count;
  let label = labels[row];
  if (!counted(label)) {
    dlogits[i] = 0.0;
    return;
  }
  var dz = exp(dlogits[i] - lse_in[row]);
  if (u32(label) == p.start + i % p.count) { dz -= 1.0; }
  dlogits[i] = dz * dz_coef();
}

@compute @workgroup_size(WG)
fn cross_entropy_gather_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * p.grid_x + gid.x;
  if (i >= p.n * p.d) { return; }
  let col = i % p.d;
  let r = index[i / p.d];
  if (r < 0 || u32(r) >= p.rows) {
    rows_out[i] = 0.0;
    if (col == 0u) {
      atomicOr(&gather_errors[0], ROW_OUT_OF_RANGE);
      atomicAdd(&gather_errors[1], 1u);
    }
    return;
  }
  rows_out[i] = h[u32(r) * p.d + col];
}
