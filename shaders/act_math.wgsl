// act_math.wgsl: the MLP nonlinearities' element formulas, shared by activations.wgsl (the
// element-wise kernels) and matmul.wgsl (its activation epilogues): the TypeScript side puts this
// file in front of each, so both compute the same values the same way. See activations.wgsl for
// the formulas and why σ and tanh are built from e^(−|v|).

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_C: f32 = 0.044715;

fn sigmoid(g: vec4<f32>) -> vec4<f32> {
  let e = exp(-abs(g));
  let s = 1.0 / (1.0 + e);
  return select(e * s, s, g >= vec4<f32>(0.0));
}

// (tanh u, sech² u)
fn tanh_sech2(u: vec4<f32>) -> array<vec4<f32>, 2> {
  let e = exp(-2.0 * abs(u));
  let t = sign(u) * (1.0 - e) / (1.0 + e);
  let q = 1.0 + e;
  return array<vec4<f32>, 2>(t, 4.0 * e / (q * q));
}

// gelu_new(a) = 0.5·a·(1 + tanh u), u = √(2/π)·(a + 0.044715·a³)
fn gelu_new(a: vec4<f32>) -> vec4<f32> {
  let u = SQRT_2_OVER_PI * (a + GELU_C * (a * a * a));
  return 0.5 * a * (1.0 + tanh_sech2(u)[0]);
}

// d gelu_new(a) / da
fn gelu_new_grad(a: vec4<f32>) -> vec4<f32> {
  let u = SQRT_2_OVER_PI * (a + GELU_C * (a * a * a));
  let ts = tanh_sech2(u);
  let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * (a * a));
  return 0.5 * (1.0 + ts[0]) + 0.5 * a * ts[1] * du;
}

// silu(g)·u
fn silu_mul(g: vec4<f32>, u: vec4<f32>) -> vec4<f32> {
  return g * sigmoid(g) * u;
}

// silu·mul's backward: (dgate, dup) for dout d, gate g, up u.
fn silu_mul_grads(d: vec4<f32>, g: vec4<f32>, u: vec4<f32>) -> array<vec4<f32>, 2> {
  let s = sigmoid(g);
  return array<vec4<f32>, 2>(d * u * (s * (1.0 + g * (1.0 - s))), d * (g * s));
}
