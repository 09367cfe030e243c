// Fuzzing the header parser: seeded mutations of a valid file (byte flips, truncations,
// insertions, deletions, numbers changed in the JSON, dtype swaps, bad lengths). Every case must
// end in a result that really is valid, or in a SafetensorsError; nothing else may escape.
import { rng } from '@webtune/core/ref';
import { describe, expect, it } from 'vitest';
import { SafetensorsError } from '../src/errors.js';
import {
  DTYPE_BYTES,
  isFloatDType,
  openSafetensors,
  parseSafetensorsHeader,
  type SafetensorsHeader,
  serializeSafetensors,
} from '../src/safetensors.js';
import { filesSource } from '../src/source.js';

const BASE = serializeSafetensors(
  [
    {
      name: 'model.embed_tokens.weight',
      dtype: 'BF16',
      shape: [4, 3],
      data: Array.from({ length: 12 }, (_, i) => i / 3),
    },
    { name: 'model.layers.0.q.weight', dtype: 'F32', shape: [3, 3], data: Array.from({ length: 9 }, (_, i) => -i) },
    { name: 'model.norm.weight', dtype: 'F16', shape: [3], data: [1, 2, 3] },
    { name: 'scalar', dtype: 'F32', shape: [], data: [7] },
    { name: 'empty', dtype: 'F16', shape: [2, 0], data: [] },
  ],
  { format: 'pt', note: 'fuzz' },
);
const HEADER_END = 8 + Number(new DataView(BASE.buffer).getBigUint64(0, true));
const utf8 = new TextEncoder();
const latin = new TextDecoder('latin1');

/** Rebuilds a file from (possibly broken) header text and the original data section. */
function withHeader(text: string, fixLength: boolean, originalLength: number): Uint8Array {
  const json = utf8.encode(text);
  const out = new Uint8Array(8 + json.length + (BASE.length - HEADER_END));
  new DataView(out.buffer).setBigUint64(0, BigInt(fixLength ? json.length : originalLength), true);
  out.set(json, 8);
  out.set(BASE.subarray(HEADER_END), 8 + json.length);
  return out;
}

const NUMBER_SWAPS = [
  '0',
  '1',
  '-1',
  '1.5',
  '1e300',
  '-0',
  '9007199254740993',
  '4294967296',
  '""',
  'null',
  '[]',
  '{}',
  '2e1',
];
const DTYPES = ['F32', 'F16', 'BF16', 'I64', 'U8', 'BOOL', 'F64', 'f32', 'Q4', '', 'F8_E4M3', 'I32'];
const JSONISH = '{}[],:"0123456789-.eE \\nulltrue';

function mutate(seed: number): { kind: string; bytes: Uint8Array } {
  const next = rng(seed);
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]) => xs[int(xs.length)] as T;
  const headerText = new TextDecoder().decode(BASE.subarray(8, HEADER_END));
  const origLength = HEADER_END - 8;
  const kind = pick(['flip', 'truncate', 'insert', 'delete', 'number', 'dtype', 'length', 'key', 'multi'] as const);
  const bytes = BASE.slice();
  switch (kind) {
    case 'flip': {
      const count = 1 + int(4);
      for (let i = 0; i < count; i++) {
        const at = int(HEADER_END + 16);
        bytes[at] = next() < 0.5 ? (bytes[at] as number) ^ (1 << int(8)) : int(256);
      }
      return { kind, bytes };
    }
    case 'truncate':
      return { kind, bytes: BASE.slice(0, int(BASE.length)) };
    case 'insert': {
      const at = int(origLength + 1);
      let ins = '';
      for (let i = 1 + int(6); i > 0; i--)
        ins += next() < 0.8 ? (JSONISH[int(JSONISH.length)] as string) : String.fromCharCode(int(0x3000));
      return {
        kind,
        bytes: withHeader(headerText.slice(0, at) + ins + headerText.slice(at), next() < 0.7, origLength),
      };
    }
    case 'delete': {
      const at = int(origLength);
      const n = 1 + int(12);
      return { kind, bytes: withHeader(headerText.slice(0, at) + headerText.slice(at + n), next() < 0.7, origLength) };
    }
    case 'number': {
      const numbers = [...headerText.matchAll(/-?\d+(\.\d+)?([eE][+-]?\d+)?/g)];
      const m = pick(numbers);
      const old = Number(m[0]);
      const swap = next() < 0.5 ? pick(NUMBER_SWAPS) : String(old + pick([-8, -4, -2, -1, 1, 2, 4, 8, 1000, -1000]));
      const at = m.index ?? 0;
      const text = headerText.slice(0, at) + swap + headerText.slice(at + m[0].length);
      return { kind, bytes: withHeader(text, next() < 0.8, origLength) };
    }
    case 'dtype': {
      const dtypes = [...headerText.matchAll(/"dtype":"([A-Z0-9_]+)"/g)];
      const m = pick(dtypes);
      const at = (m.index ?? 0) + 9;
      const text = headerText.slice(0, at) + pick(DTYPES) + headerText.slice(at + (m[1] as string).length);
      return { kind, bytes: withHeader(text, true, origLength) };
    }
    case 'length': {
      const view = new DataView(bytes.buffer);
      const choices = [
        0n,
        1n,
        7n,
        BigInt(origLength - 1),
        BigInt(origLength + 1),
        BigInt(BASE.length),
        2n ** 63n,
        BigInt(int(2 ** 31)),
      ];
      view.setBigUint64(0, pick(choices), true);
      return { kind, bytes };
    }
    case 'key': {
      const keys = ['"dtype"', '"shape"', '"data_offsets"', '"__metadata__"', '"format"'];
      const key = pick(keys);
      const replacement = pick([
        '"dtypes"',
        '"shape "',
        '"data_offset"',
        '"__meta__"',
        '"x"',
        '"__metadata__"',
        '"scalar"',
      ]);
      const text = headerText.replace(key, replacement);
      return { kind, bytes: withHeader(text, true, origLength) };
    }
    case 'multi': {
      // Several flips inside the JSON only (keeps the length right, so parsing goes deeper).
      const text = [...latin.decode(BASE.subarray(8, HEADER_END))];
      for (let i = 1 + int(3); i > 0; i--) text[int(text.length)] = JSONISH[int(JSONISH.length)] as string;
      const json = Uint8Array.from(text.join(''), (c) => c.charCodeAt(0));
      bytes.set(json, 8);
      return { kind, bytes };
    }
  }
}

/** Checks a parse result independently: offsets inside the file, tiling the data, sizes right. */
function checkValid(h: SafetensorsHeader, size: number): void {
  let at = h.dataStart;
  for (const info of h.tensors.values()) {
    expect(info.begin).toBe(at);
    expect(info.end).toBeLessThanOrEqual(size);
    const count = info.shape.reduce((a, b) => a * b, 1);
    expect(count * DTYPE_BYTES[info.dtype]).toBe(info.end - info.begin);
    at = info.end;
  }
  expect(at).toBe(size);
}

describe('safetensors header fuzzing', () => {
  it('3,000 seeded mutations end in a valid result or a SafetensorsError', async () => {
    const outcomes: Record<string, { ok: number; error: number }> = {};
    const reasons = new Set<string>();
    for (let seed = 1; seed <= 3000; seed++) {
      const { kind, bytes } = mutate(seed);
      outcomes[kind] ??= { ok: 0, error: 0 };
      let header: SafetensorsHeader | undefined;
      try {
        header = parseSafetensorsHeader(bytes, 'fuzz.safetensors');
      } catch (error) {
        if (!(error instanceof SafetensorsError)) {
          expect.fail(`seed ${seed} (${kind}): ${String(error)} is not a SafetensorsError`);
        }
        expect(error.file).toBe('fuzz.safetensors');
        reasons.add(error.reason.replace(/[\d"[\]].*$/, ''));
        (outcomes[kind] as { error: number }).error++;
        continue;
      }
      (outcomes[kind] as { ok: number }).ok++;
      checkValid(header, bytes.length);
      // What parses must read: floats as values, other dtypes as a SafetensorsError naming them.
      const file = await openSafetensors(
        filesSource([new File([bytes as BlobPart], 'fuzz.safetensors')]),
        'fuzz.safetensors',
      );
      for (const info of file.tensors.values()) {
        if (isFloatDType(info.dtype)) {
          const values = await file.readTensor(info.name);
          expect(values.length).toBe(info.shape.reduce((a, b) => a * b, 1));
        } else {
          await expect(file.readTensor(info.name)).rejects.toThrow(SafetensorsError);
        }
      }
    }
    const total = Object.values(outcomes).reduce((s, o) => s + o.ok + o.error, 0);
    const ok = Object.values(outcomes).reduce((s, o) => s + o.ok, 0);
    console.log(
      `fuzz: ${total} cases, ${ok} parsed, ${total - ok} SafetensorsError; by kind ${JSON.stringify(outcomes)}; ${reasons.size} distinct reasons`,
    );
    expect(total).toBe(3000);
    // The mutations must reach both outcomes and many different checks.
    expect(ok).toBeGreaterThan(50);
    expect(total - ok).toBeGreaterThan(1000);
    expect(reasons.size).toBeGreaterThan(12);
  });
});
