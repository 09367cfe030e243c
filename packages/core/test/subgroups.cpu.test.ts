// How the context reads the subgroup layout probe (subgroups.ts): subgroup reductions assume that
// subgroups are runs of consecutive local_invocation_index values, which WGSL does not promise. The
// probe itself runs on real adapters in context.test.ts.
import { describe, expect, it } from 'vitest';
import { subgroupLayoutOf } from '../src/subgroups.js';

/** The probe's output for a workgroup of `n` where invocation i reports (id(i), size(i)). */
function seen(n: number, id: (i: number) => number, size: (i: number) => number): Uint32Array {
  const out = new Uint32Array(2 * n);
  for (let i = 0; i < n; i++) {
    out[2 * i] = id(i);
    out[2 * i + 1] = size(i);
  }
  return out;
}

describe('subgroup layout', () => {
  it('accepts consecutive runs of one power-of-two size', () => {
    for (const size of [4, 8, 32, 64, 128]) {
      expect(
        subgroupLayoutOf(
          seen(
            256,
            (i) => i % size,
            () => size,
          ),
        ),
      ).toEqual({ contiguous: true, size });
    }
  });

  it('refuses interleaved subgroups, mixed sizes and sizes WebGPU does not allow', () => {
    // Two subgroups of 4 taking alternate invocations.
    expect(
      subgroupLayoutOf(
        seen(
          8,
          (i) => i >> 1,
          () => 4,
        ),
      ).contiguous,
    ).toBe(false);
    expect(
      subgroupLayoutOf(
        seen(
          64,
          (i) => (i < 32 ? i % 32 : i % 16),
          (i) => (i < 32 ? 32 : 16),
        ),
      ).contiguous,
    ).toBe(false);
    for (const size of [0, 1, 2, 12, 256]) {
      expect(
        subgroupLayoutOf(
          seen(
            256,
            (i) => i % Math.max(1, size),
            () => size,
          ),
        ).contiguous,
      ).toBe(false);
    }
    expect(subgroupLayoutOf(new Uint32Array(0)).contiguous).toBe(false);
  });
});
