// dropout.wgsl: LoRA dropout with a counter-based mask (no random state on the GPU).
//
//   y[i] = beta · y[i] + alpha · keep(i) · x[i] / (1 − p)
//   keep(i) = hash(seed, step, micro, module, i) ≥ threshold,  threshold = round(p · 2^32)
//
// The mask is a pure function of (seed, optimizer step, micro-batch, module, element index): the
// forward masks the LoRA branch's input (xd = dropout(x), beta = 0, alpha = 1), the backward
// recomputes the same xd for dA = s·gᵀ·xd, and adds the masked low-rank term to dx
// (dx += s · keep · (g·A) / (1 − p): beta = 1, alpha = s). A run resumed from a checkpoint, which
// restores the step, sees the same masks. hash() chains lowbias32 (a 32-bit integer mixer) over
// the five counters; core/ref/dropout.ts and tools/golden_dropout.py compute the same bits.
//
// Bindings, group 0:
//   0 p        uniform Params
//   1 counter  [4] u32 (read): seed, step, micro-batch, 0; the trainer copies in each
//              micro-batch's values before its dispatches, so a planned step needs no re-planning
//   2 x        [n] f32 (read)
//   3 y        [n] f32 (written, or accumulated when p.beta != 0)
// Threads are laid out 2-D (x fastest) so n can exceed 65535 workgroups' worth of one dimension.

struct Params {
  n: u32,
  module_id: u32,
  threshold: u32,   // drop when the hash is below it
  row_stride: u32,  // invocations per row of the dispatch grid
  alpha: f32,
  beta: f32,
  scale: f32,       // 1 / (1 − p)
  _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> counter: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

override WG: u32 = 256;

// lowbias32 (Chris Wellons' hash prospector): full avalanche on 32 bits.
fn mix32(v: u32) -> u32 {
  var h = v;
  h ^= h >> 16u;
  h *= 0x7feb352du;
  h ^= h >> 15u;
  h *= 0x846ca68bu;
  h ^= h >> 16u;
  return h;
}

@compute @workgroup_size(WG)
fn dropout_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * p.row_stride + gid.x;
  if (i >= p.n) { return; }
  var h = mix32(counter[0] ^ 0x9e3779b9u);
  h = mix32(h ^ counter[1]);
  h = mix32(h ^ counter[2]);
  h = mix32(h ^ p.module_id);
  h = mix32(h ^ i);
  var v = 0.0;
  if (h >= p.threshold) { v = p.alpha * p.scale * x[i]; }
  if (p.beta != 0.0) { v += p.beta * y[i]; }
  y[i] = v;
}
