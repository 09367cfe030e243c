/**
 * A small GGUF writer for tests (version 3, little-endian): metadata with explicit value types and
 * tensors given as raw ggml bytes, so tests can make files that are broken in one chosen way.
 */
import { GGML_TYPES } from '../src/gguf.js';

export type TestValue =
  | { readonly type: 'u32' | 'i32' | 'f32' | 'u8' | 'bool'; readonly value: number | boolean }
  | { readonly type: 'u64'; readonly value: number }
  | { readonly type: 'string'; readonly value: string }
  | {
      readonly type: 'array';
      readonly of: 'string' | 'i32' | 'f32' | 'u32';
      readonly value: readonly (string | number)[];
    };

export interface TestTensor {
  readonly name: string;
  /** ggml type name ('F32', 'Q8_0', ...) or a raw id for unknown types. */
  readonly type: string | number;
  /** Row-major shape ([rows, cols]). */
  readonly shape: readonly number[];
  readonly data: Uint8Array;
}

const TYPE_ID: Record<string, number> = { u8: 0, u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9, u64: 10 };
const enc = new TextEncoder();

export function writeGguf(
  metadata: readonly (readonly [string, TestValue])[],
  tensors: readonly TestTensor[],
  alignment = 32,
  version = 3,
): Uint8Array {
  const parts: number[] = [];
  const u8 = (n: number) => parts.push(n & 0xff);
  const u32 = (n: number) => {
    for (let i = 0; i < 4; i++) u8(n >>> (8 * i));
  };
  const u64 = (n: number) => {
    u32(n % 2 ** 32);
    u32(Math.floor(n / 2 ** 32));
  };
  const f32 = (x: number) => {
    const b = new Uint8Array(new Float32Array([x]).buffer);
    for (const v of b) u8(v);
  };
  const str = (s: string) => {
    const b = enc.encode(s);
    u64(b.length);
    for (const v of b) u8(v);
  };
  const scalar = (type: string, v: string | number | boolean) => {
    if (type === 'string') str(v as string);
    else if (type === 'f32') f32(v as number);
    else if (type === 'u64') u64(v as number);
    else if (type === 'u8') u8(v as number);
    else if (type === 'bool') u8(v ? 1 : 0);
    else u32((v as number) >>> 0);
  };
  u32(0x46554747);
  u32(version);
  u64(tensors.length);
  u64(metadata.length);
  for (const [key, v] of metadata) {
    str(key);
    u32(TYPE_ID[v.type] as number);
    if (v.type === 'array') {
      u32(TYPE_ID[v.of] as number);
      u64(v.value.length);
      for (const x of v.value) scalar(v.of, x);
    } else scalar(v.type, v.value);
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    str(t.name);
    u32(t.shape.length);
    for (const n of [...t.shape].reverse()) u64(n);
    const id =
      typeof t.type === 'number' ? t.type : Number(Object.entries(GGML_TYPES).find(([, v]) => v.name === t.type)?.[0]);
    u32(id);
    offset = Math.ceil(offset / alignment) * alignment;
    offsets.push(offset);
    u64(offset);
    offset += t.data.byteLength;
  }
  while (parts.length % alignment !== 0) u8(0);
  const head = Uint8Array.from(parts);
  const out = new Uint8Array(head.byteLength + offset);
  out.set(head);
  tensors.forEach((t, i) => {
    out.set(t.data, head.byteLength + (offsets[i] as number));
  });
  return out;
}
