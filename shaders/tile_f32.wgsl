// tile_f32.wgsl: the element type matmul.wgsl and attention.wgsl stage their tiles in, and the
// products they form from them, in f32 (every adapter). tile_f16.wgsl is the same in f16 with f32
// accumulation, for adapters with shader-f16; matmul.ts and attention.ts put one of the two first.

alias tile_t = f32;

// acc + (a·w0, a·w1, a·w2, a·w3): four dot products of a row of A with rows of W.
fn tile_dots(acc: vec4<f32>, a: vec4<tile_t>, w0: vec4<tile_t>, w1: vec4<tile_t>, w2: vec4<tile_t>, w3: vec4<tile_t>) -> vec4<f32> {
  return acc + vec4<f32>(dot(a, w0), dot(a, w1), dot(a, w2), dot(a, w3));
}

// acc + a.x·w0 + a.y·w1 + a.z·w2 + a.w·w3: A's scalars against rows of W, as fused multiply-adds.
fn tile_axpy(acc: vec4<f32>, a: vec4<tile_t>, w0: vec4<tile_t>, w1: vec4<tile_t>, w2: vec4<tile_t>, w3: vec4<tile_t>) -> vec4<f32> {
  return fma(vec4<f32>(a.x), w0, fma(vec4<f32>(a.y), w1, fma(vec4<f32>(a.z), w2, fma(vec4<f32>(a.w), w3, acc))));
}

// acc + x·y per component (attention's dot products and its P·V, dS·K, ... accumulations).
fn tile_fma(x: vec4<tile_t>, y: vec4<tile_t>, acc: vec4<f32>) -> vec4<f32> {
  return fma(x, y, acc);
}

// acc + s·y: a scalar (a probability or a score gradient, always f32) times a staged row.
fn tile_scale_fma(s: f32, y: vec4<tile_t>, acc: vec4<f32>) -> vec4<f32> {
  return fma(vec4<f32>(s), y, acc);
}
