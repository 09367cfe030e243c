// tile_f16.wgsl: tile_f32.wgsl's functions with f16 tiles and f16 products, accumulated in f32
// (the module enables f16 before this file: kernels/compose.ts). tile_dots and tile_axpy form
// four products and add them in f16, then add that to the f32 accumulator, so the rounding error
// per call is a few f16 ulps of four terms, not of the running sum; tile_fma and tile_scale_fma
// (attention) multiply and add in f32. Staging in f16 halves the tiles'
// workgroup memory and their reads; what is staged rounds to f16 (and overflows above 65504), as
// do Q8_0/Q4_0 values. matmul.ts allows it for forward-layout products of weights stored below
// f32 (a LoRA term stays f32 there) and, under a dynamic loss scale (loss_scale.wgsl) that lifts
// gradients out of the range f16 would flush (below 6e-8), for the backward's products of such
// weights; attention.ts for the forward and, under a loss scale, the tiled backward of such a
// forward (which otherwise reads q, k and v rounded alike in the f32 build). An overflow is caught
// only where the device's f16 arithmetic and conversions give ±Inf past 65504, as IEEE rounding
// does; WGSL leaves the value to the implementation, and one that clamped would pass a clamped
// gradient instead of skipping the step.

alias tile_t = f16;

fn tile_dots(acc: vec4<f32>, a: vec4<tile_t>, w0: vec4<tile_t>, w1: vec4<tile_t>, w2: vec4<tile_t>, w3: vec4<tile_t>) -> vec4<f32> {
  return acc + vec4<f32>(vec4<f16>(dot(a, w0), dot(a, w1), dot(a, w2), dot(a, w3)));
}

fn tile_axpy(acc: vec4<f32>, a: vec4<tile_t>, w0: vec4<tile_t>, w1: vec4<tile_t>, w2: vec4<tile_t>, w3: vec4<tile_t>) -> vec4<f32> {
  return acc + vec4<f32>(fma(vec4<f16>(a.x), w0, fma(vec4<f16>(a.y), w1, fma(vec4<f16>(a.z), w2, vec4<f16>(a.w) * w3))));
}

// Attention multiplies in f32 what it staged in f16: an f16·f16 product is exact in f32, while in
// f16 a product above 65504 (outlier q·k channels) would turn a score row into NaN, and f16(p)
// would flush probabilities below 6e-8 that the row's sum still counts. The halved staging is
// what the f16 build gains there.
fn tile_fma(x: vec4<tile_t>, y: vec4<tile_t>, acc: vec4<f32>) -> vec4<f32> {
  return fma(vec4<f32>(x), vec4<f32>(y), acc);
}

fn tile_scale_fma(s: f32, y: vec4<tile_t>, acc: vec4<f32>) -> vec4<f32> {
  return fma(vec4<f32>(s), vec4<f32>(y), acc);
}
