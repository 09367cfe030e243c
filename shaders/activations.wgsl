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
// Those formulas live in act_math.wgsl, which activations.ts puts in front of this file (matmul.ts
// does the same for matmul.wgsl's activation epilogues).
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

fn vec_index(gid: vec3<u32>) -> u32 {
  return gid.y * p.grid_stride + gid.x;
}

@compute @workgroup_size(WG)
fn silu_mul_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  out[v] = silu_mul(gate[v], up[v]);
}

@compute @workgroup_size(WG)
fn silu_mul_bwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  let grads = silu_mul_grads(dout[v], gate[v], up[v]);
  dgate[v] = grads[0];
  dup[v] = grads[1];
}

@compute @workgroup_size(WG)
fn gelu_new_fwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  y[v] = gelu_new(x[v]);
}

@compute @workgroup_size(WG)
fn gelu_new_bwd(@builtin(global_invocation_id) gid: vec3<u32>) {
  let v = vec_index(gid);
  if (v >= p.n4) { return; }
  dx[v] = dy[v] * gelu_new_grad(x[v]);
}
