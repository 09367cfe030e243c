// pruneWgsl (the dispatch_cost benchmark's WGSL tree-shaker) on a small module: what an entry point
// reaches stays, in order, with its overrides written in as consts; the rest goes.
import { describe, expect, it } from 'vitest';
import { pruneWgsl } from './wgsl_prune.js';

const MODULE = `enable f16;
// a comment naming unused_fn, which must not keep it
override WG: u32 = 64u;
override SCALE: f32;
override FLAG = true;
struct Params { n: u32, /* nested /* block */ comment */ }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> unused_buf: array<f32>;
const HALF = 0.5;
fn scaled(v: f32) -> f32 { return v * SCALE * HALF; }
fn unused_fn() -> f32 { return unused_buf[0]; }
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3u) {
  if (id.x < p.n) { x[id.x] = scaled(x[id.x]); }
}
@compute @workgroup_size(WG)
fn other(@builtin(global_invocation_id) id: vec3u) {
  if (FLAG) { x[id.x] = unused_fn(); }
}
`;

describe('pruneWgsl', () => {
  it('keeps what the entry point reaches, in order, with its overrides as consts', () => {
    const out = pruneWgsl(MODULE, 'main', { SCALE: 2 });
    expect(out).toContain('enable f16;');
    expect(out).toContain('const WG: u32 = 64u;');
    expect(out).toContain('const SCALE: f32 = 2.0f;');
    for (const kept of [
      'struct Params',
      'var<uniform> p',
      'var<storage, read_write> x',
      'const HALF',
      'fn scaled',
      'fn main',
    ])
      expect(out).toContain(kept);
    for (const gone of ['unused_buf', 'unused_fn', 'fn other', 'FLAG', 'comment']) expect(out).not.toContain(gone);
    expect(out.indexOf('struct Params')).toBeLessThan(out.indexOf('fn scaled'));
    expect(out.indexOf('fn scaled')).toBeLessThan(out.indexOf('fn main'));
  });

  it('reaches through the other entry point its own declarations', () => {
    const out = pruneWgsl(MODULE, 'other', { SCALE: 1 });
    expect(out).toContain('fn unused_fn');
    expect(out).toContain('var<storage, read> unused_buf');
    expect(out).toContain('const FLAG = true;');
    expect(out).not.toContain('fn scaled');
  });

  it('refuses a missing entry point, an override without a value, and a value without a type', () => {
    expect(() => pruneWgsl(MODULE, 'nope')).toThrow(/no entry point nope/);
    expect(() => pruneWgsl(MODULE, 'main')).toThrow(/override SCALE has no value/);
    expect(() => pruneWgsl(MODULE, 'other', { SCALE: 1, FLAG: false })).toThrow(/FLAG needs a type/);
  });
});
