// The embedding reference on a hand-worked example (it has no backward: the tables are frozen).
import { describe, expect, it } from 'vitest';
import { embeddingForwardRef } from '../ref/embedding.js';

describe('embeddingForwardRef', () => {
  // vocab 3, d 2: E = [[1, 2], [3, 4], [5, 6]]; wpe (maxPos 3) = [[10, 20], [30, 40], [50, 60]]
  const table = [1, 2, 3, 4, 5, 6];
  const wpe = { maxPos: 3, data: [10, 20, 30, 40, 50, 60] };

  it('gathers rows and adds the position embedding of pos0 + t % T', () => {
    const r = embeddingForwardRef({ ids: [2, 0, 1, 1], vocab: 3, d: 2, table, wpe, T: 2, pos0: 1 });
    expect([...r.out]).toEqual([35, 46, 51, 62, 33, 44, 53, 64]);
    expect(r.zeroRows).toBe(0);
  });

  it('zeroes and counts rows with an id or position out of range', () => {
    const r = embeddingForwardRef({
      ids: [3, -1, 0, 2],
      vocab: 3,
      d: 2,
      table,
      wpe,
      T: 4,
      pos0: 0,
      positions: [0, 1, 3, 2],
    });
    expect([...r.out]).toEqual([0, 0, 0, 0, 0, 0, 55, 66]);
    expect([r.badIds, r.badPositions, r.zeroRows]).toEqual([2, 1, 3]);
  });
});
