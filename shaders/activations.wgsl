// activations.wgsl: the MLP nonlinearities, element by element, forward and backward.
//
//   silu_mul_fwd:  out = silu(gate) · up,                silu(g) = g·σ(g),  σ(g) = 1 / (1 + e^−g)
//   silu_mul_bwd:  dgate = dout · up · σ(g)·(1 + g·(1 − σ(g)))      (silu recomputed from gate)
//                  dup   = dout · silu(g)
//   gelu_new_fwd:  y  = 0.5·x·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)   (GPT-2's gelu_new)
//   gelu_new_bwd:  dx = dy · (0.5·(1 + tanh u) + 0.5·x·sech²(u)·√(2/π)·(1 + 3·0.044715·x²))
//
// Llama/Qwen MLP: down(silu(gate(x)) · up(x)); the forward saves nothing beyond its inputs gate and
// up (kept for the backward). GPT-2 MLP: c_proj(gelu_new(c_fc(x))); the backward reads the saved
// input x. Every output is written (never accumulated). No parameters.
//
// σ and tanh are built from e^(−|v|) ≤ 1, which cannot overflow (WGSL leaves overflow undefined,
// and the builtin tanh may be computed as sinh/cosh): σ(g) = 1/(1+e) for g ≥ 0, e/(1+e) for g < 0
// with e = e^−|g|; tanh(u) = sign(u)·(1 − e)/(1 + e) and sech²(u) = 4e/(1 + e)² with e = e^−2|u|.
//
// Bindings, group 0 (every array holds n f32 values, read as vec4):
//   silu_mul_fwd: 0 p uniform, 1 gate (read), 2 up (read), 3 out (written)
//   silu_mul_bwd: 0 p uniform, 1 gate (read), 2 up (read), 3 dout (read), 4 dgate (written), 5 dup (written)
//   gelu_new_fwd: 0 p uniform, 1 x (read), 2 y (written)
//   gelu_new_bwd: 0 p uniform, 1 x (read), 2 dy (read), 3 dx (written)
// Each invocation handles one vec4, i.e. elements 4v .. 4v+3. When n is not a multiple of 4 the
// last vec4 reaches into the buffer's padding (every tensor's buffer is rounded up to 16 bytes),
// which is computed and written like the rest and is never part of any tensor's data.
// The invocations form a 2-D grid: v = gid.y·p.grid_stride + gid.x.

struct Params {
  n4: u32,           // number of vec4s: ceil(n / 4)
  grid_stride: u32,  // invocations per row of the dispatch grid
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> up: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dx: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dgate: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dup: array<vec4<f32>>;

override WG: u32 = 256;

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_C: f32 = 0.044715;

fn sigmoid(g: vec4<f32>) -> vec4<f32> {
  let e = exp(-abs(g));
  let s = 1.0 / (1.0 + e);
  return select(e * s, s, g >= vec4<f32>(0.0));
}

fn vec_index(gid: vec3<u32>) -> u32 {
  return gid.y * p.grid_stride + gid.x;
}

@compute @workgroup_size(WG)
fn silu_mul_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  let g = gate[v];
  out[v] = g * sigmoid(g) * up[v];
}

@compute @workgroup_size(WG)
fn silu_mul_bwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  let g = gate[v];
  let s = sigmoid(g);
  let d = dout[v];
  dgate[v] = d * up[v] * (s * (1.0 + g * (1.0 - s)));
  dup[v] = d * (g * s);
}

// (tanh u, sech² u)
fn tanh_sech2(u: vec4<f32>) -> array<vec4<f32>, 2> {
  let e = exp(-2.0 * abs(u));
  let t = sign(u) * (1.0 - e) / (1.0 + e);
  let q = 1.0 + e;
  return array<vec4<f32>, 2>(t, 4.0 * e / (q * q));
}

@compute @workgroup_size(WG)
fn gelu_new_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  let a = x[v];
  let u = SQRT_2_OVER_PI * (a + GELU_C * (a * a * a));
  y[v] = 0.5 * a * (1.0 + tanh_sech2(u)[0]);
}

@compute @workgroup_size(WG)
fn gelu_new_bwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  let a = x[v];
  let u = SQRT_2_OVER_PI * (a + GELU_C * (a * a * a));
  let ts = tanh_sech2(u);
  let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * (a * a));
  dx[v] = dy[v] * (0.5 * (1.0 + ts[0]) + 0.5 * a * ts[1] * du);
}
