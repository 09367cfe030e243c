// Which kernel configurations an adapter gets from what it says about itself (profile.ts); the
// measured case runs on real adapters in context.test.ts.
import { describe, expect, it } from 'vitest';
import { profileFromInfo } from '../src/profile.js';

const info = (over: Partial<Parameters<typeof profileFromInfo>[0]>) => ({
  vendor: '',
  architecture: '',
  device: '',
  description: '',
  isFallbackAdapter: false,
  ...over,
});

describe('kernel profile from adapter info', () => {
  it('gives CPU kernels to software drivers and fallback adapters', () => {
    expect(profileFromInfo(info({ vendor: 'google', architecture: 'swiftshader', isFallbackAdapter: true }))).toBe(
      'cpu',
    );
    expect(profileFromInfo(info({ description: 'llvmpipe (LLVM 15.0.6, 256 bits)' }))).toBe('cpu');
    expect(profileFromInfo(info({ vendor: 'mesa', description: 'lavapipe' }))).toBe('cpu');
    expect(profileFromInfo(info({ vendor: 'intel', isFallbackAdapter: true }))).toBe('cpu');
  });

  it('gives GPU kernels to a named GPU, whatever its feature level', () => {
    expect(profileFromInfo(info({ vendor: 'nvidia', architecture: 'hopper' }))).toBe('gpu');
    expect(profileFromInfo(info({ vendor: 'apple', architecture: 'metal-3' }))).toBe('gpu');
    expect(profileFromInfo(info({ description: 'ANGLE (Intel, Mesa Intel(R) UHD Graphics 620)' }))).toBe('gpu');
  });

  it('cannot tell from an adapter that names nothing (then it is measured)', () => {
    expect(profileFromInfo(info({}))).toBeUndefined();
  });
});
