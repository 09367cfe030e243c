// A probe of the adapter's compute throughput (packages/core/src/profile.ts): 64-wide workgroups
// that, ROUNDS times, exchange a vec4 with a neighbour through workgroup memory between two
// barriers and then do 16 multiply-adds, as a tiled kernel stages and multiplies. 1024 workgroups
// of 128 rounds are about 134 M multiply-adds: a few milliseconds on any GPU, tens to hundreds on
// a CPU-backed driver (SwiftShader, lavapipe). The values stay bounded (each step halves them),
// and the result is written so that the loop cannot be optimised away.

override ROUNDS: u32 = 0u;

@group(0) @binding(0) var<storage, read_write> out: array<f32>;

var<workgroup> exchange: array<vec4<f32>, 64>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
  var x = vec4<f32>(f32(li), f32(wg.x), 1.0, 2.0) * 0.001;
  for (var i = 0u; i < ROUNDS; i++) {
    exchange[li] = x;
    workgroupBarrier();
    let y = exchange[(li + 1u) % 64u] * 0.25;
    workgroupBarrier();
    x = fma(x, vec4<f32>(0.5), y);
    x = fma(x, vec4<f32>(0.5), y);
    x = fma(x, vec4<f32>(0.5), y);
    x = fma(x, vec4<f32>(0.5), y);
  }
  out[wg.x * 64u + li] = x.x + x.y + x.z + x.w;
}
