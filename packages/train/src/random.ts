/**
 * webtune's seeded random numbers for training (the adapter's initialisation, the data order): xoshiro128** (Blackman & Vigna) on 32-bit integer operations,
 * seeded through splitmix32 from a 53-bit seed and a stream name. The same seed and stream give
 * the same numbers on every machine and in every JavaScript engine; different stream names
 * ("model.layers.0.self_attn.q_proj/A") give independent streams, so what one module draws does
 * not depend on which other modules exist. The state is four u32 and can be saved with a checkpoint.
 *
 * This is not torch's generator: a webtune run is reproducible against itself, not against PyTorch.
 */

/** murmur3's 32-bit finaliser. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** A 32-bit hash of the seed's two halves and the stream name's UTF-16 units. */
function hashSeed(seed: number, stream: string): number {
  let h = fmix32((seed >>> 0) ^ 0x9e3779b9);
  h = fmix32(h ^ Math.floor(seed / 4294967296));
  for (let i = 0; i < stream.length; i++) h = fmix32(Math.imul(h ^ stream.charCodeAt(i), 0x01000193));
  return fmix32(h ^ stream.length);
}

const rotl = (x: number, k: number) => (x << k) | (x >>> (32 - k));

export type RngState = readonly [number, number, number, number];

export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;
  /** The second normal of the last Box-Muller pair, or NaN. */
  private spare = Number.NaN;

  /** `seed`: an integer in [0, 2^53); `stream`: names an independent sequence for the same seed. */
  constructor(seed: number, stream = '') {
    if (!Number.isSafeInteger(seed) || seed < 0)
      throw new RangeError(`seed must be an integer in [0, 2^53), got ${seed}`);
    // splitmix32 fills the state from the hash; it is never all zeros.
    let x = hashSeed(seed, stream);
    const next = () => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
      z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
      return (z ^ (z >>> 15)) >>> 0;
    };
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next();
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  static fromState(state: RngState): Rng {
    const rng = new Rng(0);
    [rng.s0, rng.s1, rng.s2, rng.s3] = state.map((v) => v >>> 0) as [number, number, number, number];
    if ((rng.s0 | rng.s1 | rng.s2 | rng.s3) === 0) throw new RangeError('an all-zero xoshiro state');
    return rng;
  }

  /** The generator's state (a pending Box-Muller spare is not part of it: save between draws of
   * uniform numbers or after an even number of normals). */
  state(): RngState {
    return [this.s0, this.s1, this.s2, this.s3];
  }

  /** The next u32. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** A uniform integer in [0, n), 1 <= n <= 2^32, without modulo bias (rejection). */
  below(n: number): number {
    if (!Number.isSafeInteger(n) || n < 1 || n > 2 ** 32)
      throw new RangeError(`below(n) needs 1 <= n <= 2^32, got ${n}`);
    const limit = 2 ** 32 - (2 ** 32 % n); // the largest multiple of n that fits
    for (;;) {
      const x = this.nextU32();
      if (x < limit) return x % n;
    }
  }

  /** Uniform in [0, 1) with 53 random bits. */
  uniform(): number {
    const hi = this.nextU32() >>> 5; // 27 bits
    const lo = this.nextU32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Standard normal (Box-Muller; the pair's second value is returned by the next call). */
  normal(): number {
    if (!Number.isNaN(this.spare)) {
      const v = this.spare;
      this.spare = Number.NaN;
      return v;
    }
    let u = 0;
    while (u === 0) u = this.uniform();
    const v = this.uniform();
    const radius = Math.sqrt(-2 * Math.log(u));
    this.spare = radius * Math.sin(2 * Math.PI * v);
    return radius * Math.cos(2 * Math.PI * v);
  }
}
