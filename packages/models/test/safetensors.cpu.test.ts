// safetensors reading, validation, sharded models, streaming, and the writer's byte equality with
// Python's safetensors (fixtures from tools/golden_safetensors.py).
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { f16BitsToF32, f32ToF16Bits } from '@webtune/core';
import { rng } from '@webtune/core/ref';
import { describe, expect, it } from 'vitest';
import { ModelFileError, SafetensorsError } from '../src/errors.js';
import {
  bf16ToF16BitsTable,
  decodeToFloat32,
  f16ToF32BitsTable,
  f32BitsToF16Bits,
  f32ToBf16Bits,
  isFloatDType,
  MAX_HEADER_BYTES,
  openModelWeights,
  openSafetensors,
  parseSafetensorsHeader,
  type SerializableTensor,
  serializeSafetensors,
  streamSafetensors,
  type TensorInfo,
} from '../src/safetensors.js';
import { directorySource, filesSource } from '../src/source.js';
import conversions from './fixtures/safetensors/conversions.json';

const FIXTURES = fileURLToPath(new URL('./fixtures/safetensors/', import.meta.url));
const fixture = (name: string) => new Uint8Array(readFileSync(`${FIXTURES}${name}`));

/** The golden script's value formula (see tools/golden_safetensors.py). */
function formula(count: number, seed: number): Float32Array {
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = (((i * 7919 + seed * 104729) % 2003) - 1001) / 97.3;
  return out;
}

function t(name: string, dtype: 'F32' | 'F16' | 'BF16', shape: number[], seed: number): SerializableTensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return { name, dtype, shape, data: formula(n, seed) };
}

const MIXED: SerializableTensor[] = [
  t('zeta.weight', 'F32', [3, 5], 1),
  t('alpha.bias', 'F32', [7], 2),
  t('Beta', 'BF16', [2, 3, 4], 3),
  t('a_bf16', 'BF16', [5], 4),
  t('a_f16', 'F16', [9], 5),
  t('model.layers.10.w', 'F16', [4, 1], 6),
  t('model.layers.9.w', 'F16', [1, 4], 7),
  t('scalar', 'F32', [], 8),
  { name: 'empty', dtype: 'F32', shape: [0, 3], data: [] },
  t('\u00e9l\u00e8ve', 'F32', [2], 9),
  t('\uff21wide', 'F32', [1], 10),
  t('\u{1f600}emoji', 'F32', [1], 11),
];

const u32ToF32 = (bits: readonly number[]) => new Float32Array(Uint32Array.from(bits).buffer);
const u16Bytes = (bits: readonly number[]) => new Uint8Array(Uint16Array.from(bits).buffer);

function memorySource(files: Record<string, Uint8Array | string>) {
  return filesSource(
    Object.entries(files).map(([name, data]) => new File([data as BlobPart], name)),
    'memory',
  );
}

/** A file from a header object written as given (no validation) and `dataBytes` of data. */
function rawFile(header: unknown, dataBytes: number, pad = true): Uint8Array {
  let json = typeof header === 'string' ? header : JSON.stringify(header);
  if (pad) while ((new TextEncoder().encode(json).length + 8) % 8) json += ' ';
  const text = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + text.length + dataBytes);
  new DataView(out.buffer).setBigUint64(0, BigInt(text.length), true);
  out.set(text, 8);
  return out;
}

function expectSafetensorsError(fn: () => unknown, file: string, tensor: string | undefined, reason: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (error) {
    caught = error;
  }
  expect(caught, 'expected a SafetensorsError').toBeInstanceOf(SafetensorsError);
  const e = caught as SafetensorsError;
  expect(e.file).toBe(file);
  expect(e.tensor).toBe(tensor);
  expect(e.reason).toMatch(reason);
  expect(e.message).toContain(file);
  if (tensor !== undefined) expect(e.message).toContain(`"${tensor}"`);
}

describe('serializeSafetensors writes what Python writes', () => {
  it('mixed dtypes, byte-wise name order, scalar, empty tensor, metadata', () => {
    expect(serializeSafetensors(MIXED, { format: 'pt' })).toEqual(fixture('mixed.safetensors'));
  });

  it('no metadata, and no tensors', () => {
    const plain = [t('b', 'F16', [3], 12), t('a', 'F16', [2, 2], 13)];
    expect(serializeSafetensors(plain)).toEqual(fixture('plain.safetensors'));
    expect(serializeSafetensors([])).toEqual(fixture('empty.safetensors'));
  });

  it('rounds f32 to F16 and BF16 exactly as PyTorch does (ties, subnormals, overflow)', () => {
    const x = u32ToF32(conversions.f32_bits);
    const file = serializeSafetensors(
      [
        { name: 'x_f32', dtype: 'F32', shape: [x.length], data: x },
        { name: 'x_f16', dtype: 'F16', shape: [x.length], data: x },
        { name: 'x_bf16', dtype: 'BF16', shape: [x.length], data: x },
      ],
      { format: 'pt' },
    );
    expect(file).toEqual(fixture('specials.safetensors'));
  });

  it('a PEFT adapter read back and written again is the same file', async () => {
    const source = directorySource(`${FIXTURES}adapter`);
    const file = await openSafetensors(source, 'adapter_model.safetensors');
    expect(file.metadata).toEqual({ format: 'pt' });
    expect(file.names()).toContain('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight');
    const tensors: SerializableTensor[] = [];
    for (const info of file.tensors.values()) {
      tensors.push({ name: info.name, dtype: 'F32', shape: [...info.shape], data: await file.readTensor(info.name) });
    }
    // Handed over in reverse order: the writer must sort as Python does.
    expect(serializeSafetensors(tensors.reverse(), file.metadata)).toEqual(
      fixture('adapter/adapter_model.safetensors'),
    );
  });

  it('checkpoints saved by transformers (the tiny test models) are rewritten byte for byte', async () => {
    const root = fileURLToPath(new URL('./fixtures/', import.meta.url));
    const dirs = readdirSync(root).filter((d) => existsSync(`${root}${d}/model.safetensors`));
    for (const dir of dirs) {
      const file = await openSafetensors(directorySource(`${root}${dir}`), 'model.safetensors');
      const tensors: SerializableTensor[] = [];
      for (const info of file.tensors.values()) {
        if (!isFloatDType(info.dtype)) throw new Error(`${dir}: ${info.name} is ${info.dtype}`);
        tensors.push({
          name: info.name,
          dtype: info.dtype,
          shape: [...info.shape],
          bytes: await file.readBytes(info.name),
        });
      }
      const written = serializeSafetensors(tensors, file.metadata);
      expect(written.length, dir).toBe(file.header.fileSize);
      expect(Buffer.from(written).equals(readFileSync(`${root}${dir}/model.safetensors`)), dir).toBe(true);
    }
  });

  it('accepts raw bytes and refuses bad input', () => {
    const bytes = u16Bytes([0x3c00, 0xc000]);
    const a = serializeSafetensors([{ name: 'h', dtype: 'F16', shape: [2], bytes }]);
    const b = serializeSafetensors([{ name: 'h', dtype: 'F16', shape: [2], data: [1, -2] }]);
    expect(a).toEqual(b);
    expect(() => serializeSafetensors([{ name: 'h', dtype: 'F16', shape: [3], bytes }])).toThrow(SafetensorsError);
    expect(() => serializeSafetensors([{ name: 'h', dtype: 'F32', shape: [3], data: [1] }])).toThrow(/3 elements/);
    expect(() =>
      serializeSafetensors([
        { name: 'h', dtype: 'F32', shape: [1], data: [1] },
        { name: 'h', dtype: 'F32', shape: [1], data: [1] },
      ]),
    ).toThrow(/given twice/);
    expect(() => serializeSafetensors([{ name: '__metadata__', dtype: 'F32', shape: [1], data: [1] }])).toThrow(
      /reserved/,
    );
    expect(() => serializeSafetensors([{ name: 'h', dtype: 'I64' as 'F32', shape: [1], data: [1] }])).toThrow(
      /cannot be written/,
    );
  });
});

describe('reading', () => {
  it('parses the Python-written file: names, dtypes, shapes, absolute offsets, metadata', () => {
    const bytes = fixture('mixed.safetensors');
    const h = parseSafetensorsHeader(bytes, 'mixed.safetensors');
    expect(h.metadata).toEqual({ format: 'pt' });
    expect(h.dataStart).toBe(8 + 816);
    expect([...h.tensors.keys()]).toEqual([
      'alpha.bias',
      'empty',
      'scalar',
      'zeta.weight',
      '\u00e9l\u00e8ve',
      '\uff21wide',
      '\u{1f600}emoji',
      'Beta',
      'a_bf16',
      'a_f16',
      'model.layers.10.w',
      'model.layers.9.w',
    ]);
    const beta = h.tensors.get('Beta') as TensorInfo;
    expect(beta).toMatchObject({ dtype: 'BF16', shape: [2, 3, 4], file: 'mixed.safetensors' });
    expect(beta.end - beta.begin).toBe(48);
    expect(h.tensors.get('scalar')?.shape).toEqual([]);
    // Tensors tile the data section up to the end of the file.
    let at = h.dataStart;
    for (const info of h.tensors.values()) {
      expect(info.begin).toBe(at);
      at = info.end;
    }
    expect(at).toBe(bytes.length);
  });

  it('reads F32, F16 and BF16 values exactly', async () => {
    const file = await openSafetensors(
      memorySource({ 'm.safetensors': fixture('mixed.safetensors') }),
      'm.safetensors',
    );
    for (const spec of MIXED) {
      const values = await file.readTensor(spec.name);
      const data = 'data' in spec ? Float32Array.from(spec.data) : new Float32Array(0);
      const expected =
        spec.dtype === 'F32'
          ? data
          : Float32Array.from(data, (v) =>
              spec.dtype === 'F16'
                ? f16BitsToF32(f32ToF16Bits(v))
                : (new Float32Array(new Uint32Array([f32ToBf16Bits(v) << 16]).buffer)[0] as number),
            );
      expect(values, spec.name).toEqual(expected);
    }
    await expect(file.readTensor('nope')).rejects.toThrow(SafetensorsError);
  });

  it('decodes PyTorch-written halves and bfloats to the f32 bits PyTorch gives', async () => {
    const file = await openSafetensors(directorySource(FIXTURES), 'specials.safetensors');
    const bits = async (name: string) => Array.from(new Uint32Array((await file.readTensor(name)).buffer));
    expect(await bits('x_f32')).toEqual(conversions.f32_bits);
    expect(await bits('x_bf16')).toEqual(conversions.bf16_to_f32_bits);
    const halves = decodeToFloat32('F16', u16Bytes(conversions.f16_bits));
    expect(Array.from(new Uint32Array(halves.buffer))).toEqual(conversions.f16_to_f32_bits);
  });

  it("the F16 table agrees with core's f16BitsToF32 for all 65,536 halves (NaN payloads kept)", () => {
    const table = f16ToF32BitsTable();
    const f = new Float32Array(table.buffer);
    for (let h = 0; h < 65536; h++) {
      const want = f16BitsToF32(h);
      if (Number.isNaN(want)) {
        expect(Number.isNaN(f[h])).toBe(true);
        expect((table[h] as number) & 0x7fffff).toBe((h & 0x3ff) << 13);
        expect((table[h] as number) >>> 31).toBe(h >>> 15);
      } else if (f[h] !== want || Object.is(f[h], -0) !== Object.is(want, -0)) {
        expect.fail(`half 0x${h.toString(16)}: table ${f[h]}, f16BitsToF32 ${want}`);
      }
    }
  });

  it("f32BitsToF16Bits agrees with core's f32ToF16Bits; the BF16 -> F16 table too", () => {
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    const next = rng(7);
    let checked = 0;
    // Every sign and exponent, with mantissas at and around every rounding boundary plus random.
    const lows = [0, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0x7fffff, 0x7fe000, 0x7ff000];
    for (let top = 0; top < 512; top++) {
      for (let k = 0; k < 64; k++) {
        const mant = k < lows.length ? (lows[k] as number) : Math.floor(next() * 0x800000);
        for (const extra of [0, 1 << 13, 3 << 13]) {
          const x = ((top << 23) | ((mant + extra) & 0x7fffff)) >>> 0;
          u[0] = x;
          const want = f32ToF16Bits(f[0] as number);
          if (Number.isNaN(f[0])) {
            expect(f32BitsToF16Bits(x) & 0x7e00).toBe(0x7e00);
          } else if (f32BitsToF16Bits(x) !== want) {
            expect.fail(`0x${x.toString(16)}: ${f32BitsToF16Bits(x).toString(16)} != ${want.toString(16)}`);
          }
          checked++;
        }
      }
    }
    expect(checked).toBe(512 * 64 * 3);
    // Subnormal halves: every f32 exponent that lands there, every mantissa step of 2^11.
    for (let exp = 100; exp <= 113; exp++) {
      for (let mant = 0; mant < 0x800000; mant += 0x7ff) {
        const x = (exp << 23) | mant;
        u[0] = x;
        expect(f32BitsToF16Bits(x)).toBe(f32ToF16Bits(f[0] as number));
      }
    }
    const table = bf16ToF16BitsTable();
    for (const [i, b] of conversions.f32_to_bf16_bits.entries()) {
      expect(table[b], `bf16 0x${b.toString(16)}`).toBe(conversions.bf16_to_f16_bits[i]);
    }
  });

  it('accepts non-float dtypes in a header but refuses to read them, naming the tensor', async () => {
    const bytes = rawFile(
      {
        ids: { dtype: 'I64', shape: [2], data_offsets: [0, 16] },
        w: { dtype: 'F32', shape: [1], data_offsets: [16, 20] },
      },
      20,
    );
    const file = await openSafetensors(memorySource({ 'x.safetensors': bytes }), 'x.safetensors');
    expect(file.info('ids').dtype).toBe('I64');
    await expect(file.readTensor('w')).resolves.toEqual(new Float32Array([0]));
    const error = await file.readTensor('ids').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SafetensorsError);
    expect((error as SafetensorsError).message).toMatch(/x\.safetensors, tensor "ids": dtype I64 is not supported/);
  });

  it('opens a file reading only its header', async () => {
    const bytes = fixture('mixed.safetensors');
    const reads: [number, number][] = [];
    const inner = memorySource({ 'm.safetensors': bytes });
    const source = {
      ...inner,
      readRange: (n: string, s: number, e: number) => {
        reads.push([s, e]);
        return inner.readRange(n, s, e);
      },
    };
    const file = await openSafetensors(source, 'm.safetensors');
    expect(reads).toEqual([[0, bytes.length]]); // a small file: the prefetch covers it all
    reads.length = 0;
    await file.readTensor('Beta');
    const beta = file.info('Beta');
    expect(reads).toEqual([[beta.begin, beta.end]]);
    // A header longer than the prefetch takes exactly one more read, and no data.
    const many: SerializableTensor[] = [];
    for (let i = 0; i < 4000; i++)
      many.push({ name: `layer.${i}.a_rather_long_parameter_name.weight`, dtype: 'F16', shape: [1, 1], data: [i] });
    const big = serializeSafetensors(many);
    const bigSource = memorySource({ 'b.safetensors': big });
    const bigReads: [number, number][] = [];
    const counting = {
      ...bigSource,
      readRange: (n: string, s: number, e: number) => {
        bigReads.push([s, e]);
        return bigSource.readRange(n, s, e);
      },
    };
    const opened = await openSafetensors(counting, 'b.safetensors');
    expect(opened.names().length).toBe(4000);
    expect(bigReads).toEqual([
      [0, 256 * 1024],
      [256 * 1024, opened.header.dataStart],
    ]);
  });
});

describe('validation: every bad file is a SafetensorsError naming the file and the tensor', () => {
  const F = 'bad.safetensors';
  const ok = { format: 'pt' };
  const parse = (bytes: Uint8Array) => () => parseSafetensorsHeader(bytes, F);

  it('header length past the end, over the limit, or a file too short', () => {
    const bytes = rawFile({ __metadata__: ok }, 0);
    new DataView(bytes.buffer).setBigUint64(0, BigInt(bytes.length), true);
    expectSafetensorsError(parse(bytes), F, undefined, /runs past the end of the file/);
    new DataView(bytes.buffer).setBigUint64(0, BigInt(MAX_HEADER_BYTES) + 1n, true);
    expectSafetensorsError(parse(bytes), F, undefined, /over the 100000000-byte limit/);
    new DataView(bytes.buffer).setBigUint64(0, 0xffffffffffffffffn, true);
    expectSafetensorsError(parse(bytes), F, undefined, /over the 100000000-byte limit/);
    expectSafetensorsError(parse(new Uint8Array(7)), F, undefined, /too short/);
    expectSafetensorsError(parse(rawFile('', 0, false)), F, undefined, /not a JSON object/);
  });

  it('offsets outside the data, reversed, overlapping, with gaps, or trailing bytes', () => {
    const w = (data_offsets: unknown, shape: unknown = [2]) => ({ dtype: 'F32', shape, data_offsets });
    expectSafetensorsError(parse(rawFile({ w: w([0, 16], [4]) }, 8)), F, 'w', /run past the end of the data section/);
    expectSafetensorsError(parse(rawFile({ w: w([8, 0]) }, 8)), F, 'w', /end before they begin/);
    expectSafetensorsError(
      parse(rawFile({ a: w([0, 8]), b: w([4, 12]) }, 12)),
      F,
      'b',
      /overlap those of "a" \[0, 8\]/,
    );
    expectSafetensorsError(parse(rawFile({ a: w([0, 8]), b: w([4, 4], [0]) }, 8)), F, 'b', /overlap those of "a"/);
    expectSafetensorsError(parse(rawFile({ a: w([0, 8]), b: w([12, 20]) }, 20)), F, 'b', /gap of 4 unused bytes/);
    expectSafetensorsError(parse(rawFile({ a: w([4, 12]) }, 12)), F, 'a', /gap of 4/);
    expectSafetensorsError(parse(rawFile({ a: w([0, 8]) }, 9)), F, undefined, /1 bytes after the last tensor/);
  });

  it('unknown dtypes and size mismatches', () => {
    expectSafetensorsError(
      parse(rawFile({ q: { dtype: 'Q4_K', shape: [2], data_offsets: [0, 1] } }, 1)),
      F,
      'q',
      /unsupported dtype "Q4_K"/,
    );
    expectSafetensorsError(
      parse(rawFile({ q: { dtype: 'f32', shape: [2], data_offsets: [0, 8] } }, 8)),
      F,
      'q',
      /unsupported dtype "f32"/,
    );
    expectSafetensorsError(
      parse(rawFile({ m: { dtype: 'F16', shape: [2, 3], data_offsets: [0, 8] } }, 8)),
      F,
      'm',
      /F16 with shape \[2, 3\] needs 12 bytes, but data_offsets \[0, 8\] hold 8/,
    );
    expectSafetensorsError(
      parse(rawFile({ m: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 8] } }, 8)),
      F,
      'm',
      /needs more than 2\^53 bytes/,
    );
  });

  it('not JSON, not UTF-8, not an object', () => {
    expectSafetensorsError(parse(rawFile('not json at all', 0)), F, undefined, /must start with "\{"/);
    expectSafetensorsError(parse(rawFile('{"a": {"dtype": ', 0)), F, undefined, /not valid JSON/);
    expectSafetensorsError(parse(rawFile('{"a":1} x', 0)), F, undefined, /not valid JSON/);
    const bad = rawFile('{"\u00e9":{}}', 0);
    bad[10] = 0xff;
    expectSafetensorsError(parse(bad), F, undefined, /not valid UTF-8/);
    expectSafetensorsError(parse(rawFile([1, 2], 0)), F, undefined, /must start with "\{"/);
  });

  it('missing or malformed fields, and malformed metadata', () => {
    const cases: [unknown, RegExp][] = [
      [{ shape: [1], data_offsets: [0, 4] }, /dtype is undefined/],
      [{ dtype: 'F32', data_offsets: [0, 4] }, /shape is undefined/],
      [{ dtype: 'F32', shape: [1] }, /data_offsets is undefined/],
      [{ dtype: 'F32', shape: [-1], data_offsets: [0, 4] }, /shape is an array \[-1\]/],
      [{ dtype: 'F32', shape: [1.5], data_offsets: [0, 4] }, /not a list of non-negative integers/],
      [{ dtype: 'F32', shape: ['1'], data_offsets: [0, 4] }, /not a list of non-negative integers/],
      [{ dtype: 'F32', shape: 1, data_offsets: [0, 4] }, /shape is number 1/],
      [{ dtype: 'F32', shape: [1], data_offsets: [0, 4, 8] }, /not \[begin, end\]/],
      [{ dtype: 'F32', shape: [1], data_offsets: [0, 4.5] }, /not \[begin, end\]/],
      [{ dtype: 'F32', shape: [1], data_offsets: [-4, 0] }, /not \[begin, end\]/],
      [{ dtype: 'F32', shape: [1], data_offsets: [0, 2 ** 60] }, /not \[begin, end\]/],
      [{ dtype: 7, shape: [1], data_offsets: [0, 4] }, /dtype is number 7/],
      [null, /the entry is null/],
      [[1], /the entry is an array/],
    ];
    for (const [entry, reason] of cases) expectSafetensorsError(parse(rawFile({ x: entry }, 4)), F, 'x', reason);
    expectSafetensorsError(
      parse(rawFile({ __metadata__: { a: 1 } }, 0)),
      F,
      undefined,
      /__metadata__\["a"\] is number 1/,
    );
    expectSafetensorsError(parse(rawFile({ __metadata__: 'pt' }, 0)), F, undefined, /__metadata__ is the string "pt"/);
    expectSafetensorsError(parse(rawFile({ __metadata__: null }, 0)), F, undefined, /__metadata__ is null/);
  });

  it('a tensor named __proto__ is just a name', () => {
    const h = parseSafetensorsHeader(rawFile('{"__proto__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4), F);
    expect([...h.tensors.keys()]).toEqual(['__proto__']);
  });
});

describe('sharded models', () => {
  it('opens a transformers-sharded checkpoint lazily and reads through the index', async () => {
    const dir = `${FIXTURES}sharded`;
    const source = directorySource(dir);
    const opened: string[] = [];
    const counting = {
      ...source,
      size: (n: string) => {
        opened.push(n);
        return source.size(n);
      },
    };
    const weights = await openModelWeights(counting);
    const index = JSON.parse(readFileSync(`${dir}/model.safetensors.index.json`, 'utf8'));
    expect(weights.listing).toBe('model.safetensors.index.json');
    expect(weights.names().sort()).toEqual(Object.keys(index.weight_map).sort());
    expect(weights.files().length).toBe(4);
    expect(opened).toEqual(['model.safetensors']); // the single file was looked for, no shard opened yet
    const norm = await weights.readTensor('model.norm.weight');
    expect(norm).toEqual(new Float32Array(16).fill(1));
    expect(opened).toEqual(['model.safetensors', index.weight_map['model.norm.weight']]);
    const infos = await weights.infos();
    let total = 0;
    for (const [name, info] of infos) {
      expect(info.file).toBe(index.weight_map[name]);
      expect(info.dtype).toBe('BF16');
      total += info.end - info.begin;
    }
    expect(total).toBe(index.metadata.total_size);
    expect((await weights.info('model.embed_tokens.weight')).shape).toEqual([32, 16]);
    const direct = await openSafetensors(source, index.weight_map['lm_head.weight']);
    expect(await weights.readTensor('lm_head.weight')).toEqual(await direct.readTensor('lm_head.weight'));
    await expect(weights.fileOf('model.nothing')).rejects.toThrow(
      /model\.safetensors\.index\.json, tensor "model\.nothing": no such tensor in the model/,
    );
  });

  it('a single model.safetensors is preferred', async () => {
    const weights = await openModelWeights(memorySource({ 'model.safetensors': fixture('plain.safetensors') }));
    expect(weights.listing).toBe('model.safetensors');
    expect(weights.names()).toEqual(['a', 'b']);
    expect(await weights.readTensor('b')).toEqual(
      Float32Array.from(formula(3, 12), (v) => f16BitsToF32(f32ToF16Bits(v))),
    );
  });

  it('a key in the index but missing from its shard is an error naming both', async () => {
    const shard = serializeSafetensors([{ name: 'a', dtype: 'F32', shape: [1], data: [1] }]);
    const index = JSON.stringify({
      metadata: {},
      weight_map: { a: 's1.safetensors', b: 's1.safetensors', c: 's2.safetensors' },
    });
    const weights = await openModelWeights(
      memorySource({ 'model.safetensors.index.json': index, 's1.safetensors': shard, 's2.safetensors': shard }),
    );
    const error = await weights.readTensor('a').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SafetensorsError);
    expect((error as SafetensorsError).message).toBe(
      's1.safetensors, tensor "b": listed for this file in model.safetensors.index.json, but missing from it',
    );
    await expect(weights.fileOf('c')).rejects.toThrow(/s2\.safetensors, tensor "c"/);
  });

  it('bad indexes and missing files', async () => {
    await expect(openModelWeights(memorySource({}))).rejects.toBeInstanceOf(ModelFileError);
    await expect(openModelWeights(memorySource({ 'model.safetensors.index.json': '{' }))).rejects.toThrow(
      /not valid JSON/,
    );
    await expect(
      openModelWeights(memorySource({ 'model.safetensors.index.json': '{"weight_map":[]}' })),
    ).rejects.toThrow(/weight_map is an array/);
    await expect(
      openModelWeights(memorySource({ 'model.safetensors.index.json': '{"weight_map":{"w":"../../etc/passwd"}}' })),
    ).rejects.toThrow(/tensor "w": weight_map names "..\/..\/etc\/passwd", which is not a file inside the model/);
    await expect(
      openModelWeights(memorySource({ 'model.safetensors.index.json': '{"weight_map":{"w":3}}' })),
    ).rejects.toThrow(SafetensorsError);
    const weights = await openModelWeights(
      memorySource({ 'model.safetensors.index.json': '{"weight_map":{"w":"gone.safetensors"}}' }),
    );
    await expect(weights.readTensor('w')).rejects.toThrow(/gone\.safetensors in memory: no such file/);
  });
});

describe('streamSafetensors', () => {
  function streamOf(bytes: Uint8Array, sizes: () => number): ReadableStream<Uint8Array> {
    let at = 0;
    return new ReadableStream({
      pull(controller) {
        if (at >= bytes.length) {
          controller.close();
          return;
        }
        const n = sizes();
        controller.enqueue(bytes.slice(at, at + n));
        at += n;
      },
    });
  }

  it('hands over every tensor in file order, whatever the chunking', async () => {
    const bytes = fixture('mixed.safetensors');
    const header = parseSafetensorsHeader(bytes, 'm');
    let seed = 1;
    const chunkings: (() => number)[] = [() => 1, () => 7, () => 4096, () => (seed = (seed * 48271) % 2147483647) % 50];
    for (const sizes of chunkings) {
      const got: [string, Uint8Array][] = [];
      const progress: number[] = [];
      const result = await streamSafetensors(
        streamOf(bytes, sizes),
        (info, b) => void got.push([info.name, b.slice()]),
        {
          file: 'm',
          totalBytes: bytes.length,
          onProgress: (loaded) => progress.push(loaded),
        },
      );
      expect(result.tensors).toEqual(header.tensors);
      expect(got.map(([n]) => n)).toEqual([...header.tensors.keys()]);
      for (const [name, b] of got) {
        const info = header.tensors.get(name) as TensorInfo;
        expect(b).toEqual(bytes.subarray(info.begin, info.end));
      }
      expect(progress.at(-1)).toBe(bytes.length);
    }
  });

  it('truncated streams and trailing bytes are errors', async () => {
    const bytes = fixture('mixed.safetensors');
    const header = parseSafetensorsHeader(bytes, 'm');
    const zeta = header.tensors.get('zeta.weight') as TensorInfo;
    const cut = bytes.slice(0, zeta.begin + 3);
    const error = await streamSafetensors(
      streamOf(cut, () => 100),
      () => undefined,
      { file: 'm' },
    ).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SafetensorsError);
    expect((error as SafetensorsError).tensor).toBe('zeta.weight');
    await expect(
      streamSafetensors(
        streamOf(bytes.slice(0, 5), () => 3),
        () => undefined,
      ),
    ).rejects.toThrow(/stream: the stream ended after 5 bytes, inside the header length/);
    await expect(
      streamSafetensors(
        streamOf(bytes.slice(0, 100), () => 3),
        () => undefined,
      ),
    ).rejects.toThrow(/inside the header$/);
    const longer = new Uint8Array(bytes.length + 1);
    longer.set(bytes);
    await expect(
      streamSafetensors(
        streamOf(longer, () => 64),
        () => undefined,
      ),
    ).rejects.toThrow(/goes on after the last tensor/);
    await expect(
      streamSafetensors(
        streamOf(bytes, () => 64),
        () => undefined,
        { totalBytes: bytes.length + 1 },
      ),
    ).rejects.toThrow(/1 bytes after the last tensor/);
  });

  it('an error thrown by the callback cancels the stream', async () => {
    let cancelled = false;
    const bytes = fixture('mixed.safetensors');
    let at = 0;
    const stream = new ReadableStream<Uint8Array>({
      pull(c) {
        if (at >= bytes.length) return c.close();
        c.enqueue(bytes.slice(at, at + 64));
        at += 64;
      },
      cancel() {
        cancelled = true;
      },
    });
    await expect(
      streamSafetensors(stream, () => {
        throw new Error('stop');
      }),
    ).rejects.toThrow('stop');
    expect(cancelled).toBe(true);
  });
});
