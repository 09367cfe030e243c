import { ShapeError } from './errors.js';

export type Shape = readonly number[];

export function formatShape(shape: Shape): string {
  return `[${shape.join(', ')}]`;
}

/** Throws ShapeError unless every dimension is a positive safe integer. */
export function assertShape(what: string, shape: Shape): void {
  if (shape.length === 0) throw new ShapeError(`${what}: a shape needs at least one dimension`);
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 1) {
      throw new ShapeError(`${what}: dimension ${String(d)} in ${formatShape(shape)} is not a positive integer`);
    }
  }
}

export function numel(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Checks `shape` equals `expected`, where a null entry accepts any size. */
export function expectShape(
  op: string,
  name: string,
  shape: Shape,
  expected: readonly (number | null)[],
  explain: string,
): void {
  const ok = shape.length === expected.length && expected.every((e, i) => e === null || e === shape[i]);
  if (!ok) {
    const want = `[${expected.map((e) => (e === null ? '*' : String(e))).join(', ')}]`;
    throw new ShapeError(`${op}: ${name} has shape ${formatShape(shape)}, expected ${want} (${explain})`);
  }
}
