// rope_math.wgsl: cos θ and sin θ for RoPE, as PyTorch's f32 cos/sin (see shaders/rope.wgsl's
// header). Put in front of rope.wgsl and attention.wgsl by their TypeScript.

const TWO_OVER_PI: f32 = 0.6366197466850281;
// π/2 = C1 + C2 + C3 + C4 (C1..C3 with 7 significant bits)
const PIO2_C1: f32 = 1.578125;
const PIO2_C2: f32 = -0.00732421875;
const PIO2_C3: f32 = -4.470348358154297e-06;
const PIO2_C4: f32 = 1.5893254712295857e-08;

// (cos θ, sin θ)
fn cos_sin(theta: f32) -> vec2<f32> {
  let k = round(theta * TWO_OVER_PI);
  var r = theta - k * PIO2_C1;
  r = r - k * PIO2_C2;
  r = r - k * PIO2_C3;
  r = r - k * PIO2_C4;
  let r2 = r * r;
  let sin_r = r + r * r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362880.0))));
  let cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24.0 + r2 * (-1.0 / 720.0 + r2 * (1.0 / 40320.0 + r2 * (-1.0 / 3628800.0)))));
  switch (i32(k) & 3) {
    case 0: { return vec2<f32>(cos_r, sin_r); }
    case 1: { return vec2<f32>(-sin_r, cos_r); }
    case 2: { return vec2<f32>(-cos_r, -sin_r); }
    default: { return vec2<f32>(sin_r, -cos_r); }
  }
}
