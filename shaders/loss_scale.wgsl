// loss_scale.wgsl: dynamic loss scaling's update, one invocation after AdamW (adamw_step_scaled)
// in every step whose backward runs its products in f16 (torch.amp.GradScaler.update's rule, on the
// GPU, so that no step waits for the host to read whether it overflowed).
//
// The loss's gradient is multiplied by S (cross_entropy.wgsl's scaled finish), so every gradient of
// the backward carries S: f16 tiles staging them neither flush small values (below 6e-8) nor, while
// S is right, overflow large ones (above 65504). An overflow shows as a gradient that is not finite
// (reduce.wgsl's finite flag, norm[1] != 1): AdamW skipped that step and S falls by `backoff`;
// after `interval` steps in a row with finite gradients S rises by `growth`. S stays a power of two
// within [min_scale, max_scale] (the factors are powers of two), so scaling and unscaling are
// exact.
//
// state (f32, read and written): [0] S for the next step, [1] finite steps since S last changed,
// [2] S this step used (what the host reports and divides the gradient norm by), [3] overflowed
// steps since the state was last written by the host (for inspection; the trainer neither reports
// nor checkpoints it). A step that AdamW's guard latched (a non-finite loss: a divergence, or a step
// queued behind one) changes nothing but [2]: it did not happen.
//
// Bindings, group 0: 0 p uniform, 1 norm [3] (read: N, finite flag, non-finite count), 2 guard [1]
// (read: adamw.wgsl's latch, after this step's AdamW), 3 state [4] (read and written).

struct Params {
  growth: f32,
  backoff: f32,
  min_scale: f32,
  max_scale: f32,
  interval: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> norm: array<f32>;
@group(0) @binding(2) var<storage, read> guard: array<u32>;
@group(0) @binding(3) var<storage, read_write> state: array<f32>;

@compute @workgroup_size(1)
fn loss_scale_update() {
  let s = state[0];
  state[2] = s;
  if (guard[0] != 0u) {
    return;
  }
  if (norm[1] != 1.0) {
    state[0] = max(s * p.backoff, p.min_scale);
    state[1] = 0.0;
    state[3] = state[3] + 1.0;
    return;
  }
  let good = state[1] + 1.0;
  if (good >= f32(p.interval)) {
    state[0] = min(s * p.growth, p.max_scale);
    state[1] = 0.0;
  } else {
    state[1] = good;
  }
}
