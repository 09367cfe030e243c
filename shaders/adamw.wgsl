// adamw.wgsl: one AdamW step (torch.optim.AdamW: decoupled weight decay, amsgrad and maximize
// off) over a whole flat f32 arena of parameters, with torch.nn.utils.clip_grad_norm_ fused in.
//
// Per element i, step t ≥ 1, with N = norm[0] the global gradient norm from reduce.wgsl:
//   g  = grad[i] · c,  c = min(max_norm / (N + 1e-6), 1)      (c = 1 when max_norm ≤ 0)
//   param ← param · (1 − lr·wd)
//   m  ← lerp(m, g, 1 − β1)                     = β1·m + (1 − β1)·g
//   v  ← v·β2 + (1 − β2)·g·g
//   param ← param − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
// which is m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t), param ← param − lr·m̂/(sqrt(v̂) + eps), written in
// the order of operations of torch's _single_tensor_adam (and _multi_tensor_adam) so that f32
// results agree to an ulp or two:
//   - the scalars (1 − lr·wd, 1 − β1, 1 − β2, lr/(1 − β1^t), sqrt(1 − β2^t)) are computed by the
//     host in float64 and rounded to f32 once, as torch rounds Python scalars;
//   - torch.lerp(m, g, w) is m + w·(g − m) for w < 0.5, else g − (g − m)·(1 − w);
//   - eps is added after dividing sqrt(v) by sqrt(1 − β2^t) (it is not scaled by the correction);
//   - clip_grad_norm_ computes (1 / (N + 1e-6)) · max_norm (Tensor.__rtruediv__), clamps it to 1
//     and multiplies the gradient by it.
//
// Non-finite gradients: unless norm[1] == 1.0 (reduce.wgsl's flag: every gradient finite and N
// finite), the kernel writes nothing, so param, m and v keep their previous values. A norm buffer
// that was never computed (zeros) therefore also leaves everything untouched.
//
// Bindings, group 0: 0 u uniform (layout below; the first 8 fields are rewritten every step),
//   1 norm [3] (read: N, finite flag, non-finite count), 2 grad [n] (read; never modified: the
//   clipped gradient exists only in registers), 3 param [n], 4 m [n], 5 v [n] (read and written
//   in place). The arenas hold their tensors at aligned offsets with zero padding in between;
//   padding stays zero (zero gradient, parameter and moments give a zero update).
// Threads are laid out 2-D (x fastest), one element each, so n may exceed 65535 workgroups' worth.
//
// adamw_step_guarded: the same update, for a trainer that queues the next step before it has read
// this one's loss (no stall on the host). It also skips when one of the step's losses is not
// finite, and it latches: the first step that skips sets guard[0] = 1, and every later step skips
// while guard[0] != 0, so steps already queued behind a diverged one change nothing either, and
// the adapter stays as it was before the divergence until the host (having read it) clears the
// latch. Extra bindings: 6 losses [2·loss_count] (read: per micro-batch [loss, count], loss at
// even indices), 7 guard [1] (atomic u32, read and written). Finiteness is tested on the bits,
// as in reduce.wgsl (WGSL may fold away x != x).
//
// adamw_step_scaled: adamw_step_guarded for gradients that carry a loss scale S (the f16
// backward's dynamic loss scaling: loss_scale.wgsl). Extra binding: 8 loss_scale [≥ 1] (read:
// S = loss_scale[0], a power of two). The update takes grad[i]·(1/S) and the norm N·(1/S), exact
// for a power of two, so a step at scale S updates as the unscaled step would (torch's
// GradScaler.unscale_ then clip_grad_norm_). A gradient that is not finite is the scale's
// overflow, not a divergence: the step is skipped and nothing latches (loss_scale_update then
// lowers S), unless S is already at its floor u.min_scale, where it is a divergence and latches
// like a non-finite loss.

struct Params {
  decay: f32,           // 1 − lr·weight_decay
  beta2: f32,           // β2
  one_minus_beta1: f32, // 1 − β1: the lerp weight
  one_minus_beta2: f32, // 1 − β2
  step_size: f32,       // lr / (1 − β1^t)
  bc2_sqrt: f32,        // sqrt(1 − β2^t)
  eps: f32,
  max_norm: f32,        // ≤ 0: no clipping
  n: u32,               // elements of the arena
  row_stride: u32,      // invocations per row of the 2-D grid
  loss_count: u32,      // adamw_step_guarded, adamw_step_scaled: micro-batch losses to check
  min_scale: f32,       // adamw_step_scaled: the loss scale's floor
}

@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read> norm: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;
@group(0) @binding(6) var<storage, read> losses: array<f32>;
@group(0) @binding(7) var<storage, read_write> guard: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read> loss_scale: array<f32>;

override WG: u32 = 256;

@compute @workgroup_size(WG)
fn adamw_step(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * u.row_stride + gid.x;
  if (i >= u.n || norm[1] != 1.0) {
    return;
  }
  update(i, 1.0);
}

fn is_finite(x: f32) -> bool {
  return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(WG)
fn adamw_step_guarded(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * u.row_stride + gid.x;
  let ok = norm[1] == 1.0 && losses_finite();
  // Every invocation computes the same ok; one of them latches it. An invocation that reads the
  // latch while it is being set has ok == false anyway, so the race cannot change the outcome.
  if (!ok) {
    if (i == 0u) { atomicStore(&guard[0], 1u); }
    return;
  }
  if (i >= u.n || atomicLoad(&guard[0]) != 0u) {
    return;
  }
  update(i, 1.0);
}

fn losses_finite() -> bool {
  var ok = true;
  for (var k = 0u; k < u.loss_count; k++) {
    ok = ok && is_finite(losses[2u * k]);
  }
  return ok;
}

@compute @workgroup_size(WG)
fn adamw_step_scaled(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.y * u.row_stride + gid.x;
  let s = loss_scale[0];
  let grads_ok = norm[1] == 1.0;
  // As in adamw_step_guarded, every invocation computes the same outcome.
  if (!losses_finite() || (!grads_ok && s <= u.min_scale)) {
    if (i == 0u) { atomicStore(&guard[0], 1u); }
    return;
  }
  if (!grads_ok || i >= u.n || atomicLoad(&guard[0]) != 0u) {
    return;
  }
  update(i, 1.0 / s);
}

// One element's update; inv_scale unscales the gradient and its norm (1 without a loss scale, where
// the products by 1 change no bit).
fn update(i: u32, inv_scale: f32) {
  var g = grad[i] * inv_scale;
  if (u.max_norm > 0.0) {
    let coef = min((1.0 / (norm[0] * inv_scale + 1e-6)) * u.max_norm, 1.0);
    g = g * coef;
  }
  let w = u.one_minus_beta1;
  let m0 = m[i];
  let m1 = select(g - (g - m0) * (1.0 - w), m0 + w * (g - m0), w < 0.5);
  let v1 = v[i] * u.beta2 + (u.one_minus_beta2 * g) * g;
  let denom = sqrt(v1) / u.bc2_sqrt + u.eps;
  param[i] = param[i] * u.decay + (-u.step_size * m1) / denom;
  m[i] = m1;
  v[i] = v1;
}
