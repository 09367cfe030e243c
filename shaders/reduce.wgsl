// reduce.wgsl: the sum, or the L2 norm, of a whole flat f32 array (the gradient arena), in two
// dispatches recorded in the same step, so no value travels to the host.
//
//   square = 0:  out[0] = Σ_i x[i]                    (finite x[i] only)
//   square = 1:  out[0] = sqrt(Σ_i x[i]²)             (finite x[i] only: the global gradient norm)
//                out[1] = 1.0 if every x[i] is finite and the sum is finite, else 0.0
//                out[2] = how many x[i] are NaN or ±Inf (as f32; counted in f32, so exact up to
//                2^24 of them, and never 0 when there is one)
//
// Finiteness is tested on the bits (exponent all ones), never with x != x or comparisons with
// infinity, which WGSL lets an implementation fold away. A sum that overflows f32 (a norm above
// ~1.8e19) also clears the flag. Consumers (adamw.wgsl) skip their update unless out[1] == 1.0.
//
// Order of summation (f32 throughout, pairwise where it matters):
//   reduce_partial: workgroup w covers the chunk [w·WG·per_thread, (w+1)·WG·per_thread). Its
//     invocation j takes the elements j, j + WG, j + 2·WG, ... of the chunk (reads coalesced
//     across the workgroup), adds them in runs of 8 and adds the runs' sums; the WG results are
//     then added by group_sum2 (group_reduce.wgsl's binary tree, or its subgroup twin: put first
//     by reduce.ts).
//   reduce_final: one workgroup; invocation j adds partials j, j + WG, ..., then group_sum2.
//   The host (reduce.ts) keeps per_thread and the partials per invocation small, so the error is
//   ~(8 + per_thread/8 + groups/WG + 2·log2 WG) ulps of the sum at worst with the trees; the
//   subgroup build ends each group_sum2 with a serial sum of the WG / subgroup-size subgroup
//   totals, up to WG/4 terms.
//
// Bindings, group 0:
//   reduce_partial: 0 p uniform, 1 x [n] (read), 2 partials [2·groups] (written: per workgroup
//                   its sum and its count of non-finite values)
//   reduce_final:   0 p uniform, 1 partials [2·groups] (read), 2 out [3] (written)
// Nothing is accumulated; nothing is saved for a backward (there is none).

struct Params {
  n: u32,          // elements of x
  per_thread: u32, // elements each invocation of reduce_partial adds serially
  groups: u32,     // workgroups of reduce_partial = partial sums
  square: u32,     // 1: sum of squares and out[0] = its square root; 0: plain sum
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials_out: array<f32>;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

override WG: u32 = 256; // invocations per workgroup, a power of two

fn is_finite(v: f32) -> bool {
  return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(WG)
fn reduce_partial(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
  let base = wid.x * WG * p.per_thread + tid;
  var s = 0.0;
  var nb = 0u;
  for (var k0 = 0u; k0 < p.per_thread; k0 += 8u) {
    var run = 0.0;
    for (var k = k0; k < min(k0 + 8u, p.per_thread); k++) {
      let i = base + k * WG;
      if (i < p.n) {
        let v = x[i];
        if (is_finite(v)) {
          run += select(v, v * v, p.square != 0u);
        } else {
          nb += 1u;
        }
      }
    }
    s += run;
  }
  let total = group_sum2(tid, WG, vec2<f32>(s, f32(nb)));
  if (tid == 0u) {
    partials_out[2u * wid.x] = total.x;
    partials_out[2u * wid.x + 1u] = total.y; // ≤ WG·per_thread, exact in f32
  }
}

@compute @workgroup_size(WG)
fn reduce_final(@builtin(local_invocation_index) tid: u32) {
  var acc = vec2<f32>(0.0);
  for (var j = tid; j < p.groups; j += WG) {
    acc += vec2<f32>(partials[2u * j], partials[2u * j + 1u]);
  }
  let sums = group_sum2(tid, WG, acc);
  if (tid == 0u) {
    let total = sums.x;
    let count = sums.y;
    let ok = count == 0.0 && is_finite(total);
    out[0] = select(total, sqrt(total), p.square != 0u);
    out[1] = select(0.0, 1.0, ok);
    out[2] = count;
  }
}
