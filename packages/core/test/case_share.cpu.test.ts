// The shares of the kernel tables that projects run (gpu.ts's inShare, vitest.config.ts's
// caseShare and profileSplit): thirds of about a third each that are disjoint and together cover
// the table, and Node's split between its two kernel configurations runs each case once.
import { describe, expect, it } from 'vitest';
import { inShare } from './gpu.js';

const titles = Array.from(
  { length: 600 },
  (_, i) => `M=${i % 257} N=${(i * 7) % 65} K=${i} case ${i}${i % 2 ? ' (staged)' : ' (direct)'}`,
);

describe('table shares', () => {
  it('runs everything without a share', () => {
    expect(titles.every((t) => inShare(t, undefined))).toBe(true);
  });

  it('splits a table into disjoint thirds of about a third each that together cover it', () => {
    const thirds = [0, 1, 2].map((at) => titles.filter((t) => inShare(t, { of: 3, at: [at] })));
    for (const third of thirds) expect(Math.abs(third.length - titles.length / 3)).toBeLessThan(titles.length / 10);
    expect(thirds.flat().sort()).toEqual([...titles].sort());
  });

  it("splits a table between Node's two kernel configurations, each case once", () => {
    const cpu = { of: 3, at: [2] };
    const gpu = { of: 3, at: [0, 1] };
    for (const t of titles) expect(inShare(t, cpu) !== inShare(t, gpu), t).toBe(true);
  });

  it('runs nothing of a table with an empty share', () => {
    expect(titles.some((t) => inShare(t, { of: 3, at: [] }))).toBe(false);
  });
});
