// Weight upload to the GPU: F32, F16 and BF16 tensors to f16 and f32 GPU tensors, read back and
// compared bit for bit with PyTorch's conversions (fixtures/safetensors/conversions.json from
// tools/golden_safetensors.py). Runs in Node and Chromium, so everything is built in memory.
import {
  bf16BitsToF32,
  LimitExceededError,
  packQuantized,
  quantize,
  readBytes,
  readFloat32,
  roundThrough,
  type Tensor,
} from '@webtune/core';
import { describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { ModelFileError, SafetensorsError } from '../src/errors.js';
import {
  f32ToBf16Bits,
  openModelWeights,
  openSafetensors,
  type SafetensorsFile,
  type SerializableTensor,
  serializeSafetensors,
} from '../src/safetensors.js';
import { filesSource, type ModelSource } from '../src/source.js';
import { transpose2d, type UploadOptions, uploadSafetensorsStream, uploadTensor } from '../src/weights.js';
import conversions from './fixtures/safetensors/conversions.json';

const gpu = useGpu();

// Odd lengths, so the last f16 word is half padding.
const odd = (xs: readonly number[]) => xs.slice(0, xs.length - 1 + (xs.length % 2));
const X = odd(conversions.f32_bits);
const X_F16 = odd(conversions.f32_to_f16_bits);
const X_BF16 = odd(conversions.f32_to_bf16_bits);
const BF16_F16 = odd(conversions.bf16_to_f16_bits);
const BF16_F32 = odd(conversions.bf16_to_f32_bits);
const H = odd(conversions.f16_bits);
const H_F32 = odd(conversions.f16_to_f32_bits);

/** Values as serializeSafetensors stores them in BF16. */
const roundToBf16 = (values: readonly number[]) => Float32Array.from(values, (v) => bf16BitsToF32(f32ToBf16Bits(v)));

const u32Bytes = (bits: readonly number[]) => new Uint8Array(Uint32Array.from(bits).buffer);
const u16Bytes = (bits: readonly number[]) => new Uint8Array(Uint16Array.from(bits).buffer);

const FILE = serializeSafetensors(
  [
    { name: 'x.f32', dtype: 'F32', shape: [X.length], bytes: u32Bytes(X) },
    { name: 'x.bf16', dtype: 'BF16', shape: [X_BF16.length], bytes: u16Bytes(X_BF16) },
    { name: 'h.f16', dtype: 'F16', shape: [H.length], bytes: u16Bytes(H) },
    { name: 'one.f16', dtype: 'F16', shape: [1], data: [0.5] },
    // A Conv1D-like weight stored [in, out] = [3, 5].
    { name: 'conv.weight', dtype: 'F32', shape: [3, 5], data: Array.from({ length: 15 }, (_, i) => i + 1 / 3) },
    { name: 'ids', dtype: 'F32', shape: [0], data: [] },
    { name: 'scale', dtype: 'BF16', shape: [], data: [-3] },
  ] satisfies SerializableTensor[],
  { format: 'pt' },
);

function source(bytes = FILE): ModelSource {
  return filesSource([new File([bytes as BlobPart], 'model.safetensors')]);
}

async function bits(t: Tensor): Promise<number[]> {
  const bytes = await readBytes(t.ctx, t.buffer, Math.ceil(t.byteLength / 4) * 4, `${t.label}.bits`);
  return Array.from(t.dtype === 'f16' ? new Uint16Array(bytes, 0, t.size) : new Uint32Array(bytes, 0, t.size));
}

/** Bit-exact comparison that reports the first few differences rather than the whole array. */
function expectBits(name: string, actual: readonly number[], expected: readonly number[]): void {
  expect(actual.length, `${name}: length`).toBe(expected.length);
  const bad: string[] = [];
  for (let i = 0; i < expected.length && bad.length < 5; i++) {
    if (actual[i] !== expected[i])
      bad.push(`[${i}] got 0x${actual[i]?.toString(16)} want 0x${expected[i]?.toString(16)}`);
  }
  expect(bad, `${name}: bit mismatches`).toEqual([]);
}

interface Case {
  tensor: string;
  dtype: 'f16' | 'f32';
  expected: readonly number[];
  chunkBytes?: number;
  /** The inputs hold values beyond f16's range on purpose (65520, 3e38...). */
  allowOverflow?: boolean;
}

// Every source dtype to both targets; small chunks (odd byte counts included) cross many chunk
// boundaries, the default size takes the whole tensor in one read.
const CASES: Case[] = [
  { tensor: 'x.f32', dtype: 'f32', expected: X, chunkBytes: 4 * 64 },
  { tensor: 'x.f32', dtype: 'f16', expected: X_F16, chunkBytes: 4 * 63 + 2, allowOverflow: true },
  { tensor: 'x.bf16', dtype: 'f32', expected: BF16_F32 },
  { tensor: 'x.bf16', dtype: 'f16', expected: BF16_F16, chunkBytes: 30, allowOverflow: true },
  { tensor: 'h.f16', dtype: 'f16', expected: H, chunkBytes: 2 * 65 },
  { tensor: 'h.f16', dtype: 'f32', expected: H_F32, chunkBytes: 22 },
  { tensor: 'one.f16', dtype: 'f16', expected: [0x3800] },
  { tensor: 'one.f16', dtype: 'f32', expected: [0x3f000000] },
];

describe('uploadTensor', () => {
  it.each(CASES)('$tensor -> $dtype (chunks of $chunkBytes bytes)', async (c) => {
    const ctx = gpu();
    const file = await openSafetensors(source(), 'model.safetensors');
    await gpuCase(ctx, `${c.tensor} -> ${c.dtype}`, async () => {
      const progress: [number, number][] = [];
      const t = await uploadTensor(ctx, file, c.tensor, {
        dtype: c.dtype,
        chunkBytes: c.chunkBytes,
        allowOverflow: c.allowOverflow,
        onProgress: (loaded, total) => progress.push([loaded, total]),
      });
      try {
        expect(t.label).toBe(c.tensor);
        expect(t.shape).toEqual([c.expected.length]);
        expect(t.dtype).toBe(c.dtype);
        expectBits(`${c.tensor} -> ${c.dtype}`, await bits(t), c.expected);
        const info = file.info(c.tensor);
        const total = info.end - info.begin;
        const chunks = c.chunkBytes ? Math.ceil(total / (c.chunkBytes - (c.chunkBytes % 4))) : 1;
        expect(progress.at(-1)).toEqual([total, total]);
        expect(progress.length).toBeGreaterThanOrEqual(Math.min(chunks, 2));
        for (let i = 1; i < progress.length; i++)
          expect(progress[i]?.[0]).toBeGreaterThan(progress[i - 1]?.[0] as number);
      } finally {
        t.dispose();
      }
    });
  });

  it('refuses values beyond the f16 range unless allowed, and uploads scalars as [1]', async () => {
    const ctx = gpu();
    const file = await openSafetensors(source(), 'model.safetensors');
    await gpuCase(ctx, 'overflow', async () => {
      for (const name of ['x.f32', 'x.bf16']) {
        const error = await uploadTensor(ctx, file, name, { dtype: 'f16', chunkBytes: 64 }).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(SafetensorsError);
        expect((error as SafetensorsError).message).toMatch(
          new RegExp(
            `^model\\.safetensors, tensor "${name.replace('.', '\\.')}": \\d+ values \\(e\\.g\\. -?[\\d.e+]+\\) are beyond f16's range`,
          ),
        );
      }
      const scale = await uploadTensor(ctx, file, 'scale', { dtype: 'f32' });
      try {
        expect(scale.shape).toEqual([1]);
        expectBits('scalar', await bits(scale), [0xc0400000]);
      } finally {
        scale.dispose();
      }
    });
  });

  it('transposes a Conv1D weight through `transform`, and labels and reshapes', async () => {
    const ctx = gpu();
    const weights = await openModelWeights(source());
    await gpuCase(ctx, 'transform', async () => {
      const t = await uploadTensor(ctx, weights, 'conv.weight', {
        dtype: 'f32',
        label: 'h.0.attn.c_attn.w',
        shape: [5, 3],
        transform: (data, info) => transpose2d(data, info.shape[0] as number, info.shape[1] as number),
      });
      try {
        expect(t.label).toBe('h.0.attn.c_attn.w');
        expect(t.shape).toEqual([5, 3]);
        const expected = new Float32Array(15);
        for (let r = 0; r < 3; r++) for (let c = 0; c < 5; c++) expected[c * 3 + r] = r * 5 + c + 1 / 3;
        expectBits('transposed', await bits(t), Array.from(new Uint32Array(expected.buffer)));
      } finally {
        t.dispose();
      }
    });
  });

  it('quantizes to q8_0 and q4_0 chunk by chunk, as core quantizes the whole tensor', async () => {
    const ctx = gpu();
    // 5 rows of 96: 15 blocks, so chunks of 64 values (2 blocks, the smallest) end mid-row and the
    // last chunk holds one block (an odd count of scales).
    const values = Array.from({ length: 5 * 96 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 13)));
    const file = serializeSafetensors(
      [
        { name: 'w.f32', dtype: 'F32', shape: [5, 96], data: values },
        { name: 'w.bf16', dtype: 'BF16', shape: [5, 96], data: values },
      ],
      { format: 'pt' },
    );
    const weights = await openModelWeights(source(file));
    for (const dtype of ['q8_0', 'q4_0'] as const) {
      for (const [name, chunkBytes] of [
        ['w.f32', 256],
        ['w.f32', 1000],
        ['w.bf16', 128],
        ['w.bf16', 1 << 20],
      ] as const) {
        await gpuCase(ctx, `${name} ${dtype} ${chunkBytes}`, async () => {
          const t = await uploadTensor(ctx, weights, name, { dtype, chunkBytes });
          try {
            const exact = name === 'w.f32' ? values : Array.from(roundToBf16(values));
            const gpuBytes = new Uint8Array(await readBytes(ctx, t.buffer, t.buffer.size, 'q'));
            expect(gpuBytes.subarray(0, t.byteLength)).toEqual(
              packQuantized(quantize(dtype, Float32Array.from(exact))).subarray(0, t.byteLength),
            );
            expect(await readFloat32(t)).toEqual(roundThrough(dtype, exact));
          } finally {
            t.dispose();
          }
        });
      }
    }
  });

  it('refuses a tensor larger than maxBufferSize with LimitExceededError before reading it', async () => {
    const ctx = gpu();
    const max = ctx.limits.maxBufferSize;
    const count = Math.floor(max / 4) + 4;
    expect(Number.isSafeInteger(count * 4)).toBe(true);
    // A header that claims a huge tensor; the source has no data and fails any read of it.
    const header = serializeSafetensors([{ name: 'huge.weight', dtype: 'F32', shape: [1], data: [0] }]);
    const text = new TextDecoder().decode(header.subarray(8, header.length - 4));
    const claimed = new TextEncoder().encode(
      text
        .replace('"shape":[1]', `"shape":[${count}]`)
        .replace('[0,4]', `[0,${count * 4}]`)
        .trimEnd(),
    );
    const head = new Uint8Array(8 + claimed.length);
    new DataView(head.buffer).setBigUint64(0, BigInt(claimed.length), true);
    head.set(claimed, 8);
    const reads: [number, number][] = [];
    const synthetic: ModelSource = {
      description: 'synthetic',
      readText: async () => undefined,
      size: async () => head.length + count * 4,
      readRange: async (name, start, end) => {
        reads.push([start, end]);
        // The header prefetch may read past the header (zeros); any read of tensor data fails.
        if (start >= head.length) throw new ModelFileError('synthetic', name, 'no data here');
        const out = new Uint8Array(end - start);
        out.set(head.subarray(start, end));
        return out;
      },
    };
    const file = await openSafetensors(synthetic, 'model.safetensors');
    expect(file.info('huge.weight').shape).toEqual([count]);
    reads.length = 0;
    await gpuCase(ctx, 'limit', async () => {
      for (const transform of [undefined, (d: Float32Array) => d]) {
        const error = await uploadTensor(ctx, file, 'huge.weight', {
          dtype: 'f32',
          label: 'layer.9.huge',
          transform,
        }).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(LimitExceededError);
        expect((error as LimitExceededError).what).toBe('layer.9.huge');
        expect((error as Error).message).toMatch(/^layer\.9\.huge needs maxBufferSize/);
      }
    });
    expect(reads).toEqual([]);
  });

  it('releases the tensor when a read fails halfway, and refuses bad requests', async () => {
    const ctx = gpu();
    const inner = source();
    let calls = 0;
    const flaky: ModelSource = {
      ...inner,
      readRange: async (name, start, end) => {
        if (++calls === 3) throw new ModelFileError(inner.description, name, 'connection reset');
        return inner.readRange(name, start, end);
      },
    };
    const file: SafetensorsFile = await openSafetensors(flaky, 'model.safetensors');
    await gpuCase(ctx, 'failure', async () => {
      await expect(
        uploadTensor(ctx, file, 'x.f32', { dtype: 'f16', chunkBytes: 64, allowOverflow: true }),
      ).rejects.toThrow(/connection reset/);
      const aborted = new AbortController();
      aborted.abort();
      await expect(uploadTensor(ctx, file, 'x.f32', { dtype: 'f32', signal: aborted.signal })).rejects.toThrow(
        /abort/i,
      );
      await expect(uploadTensor(ctx, file, 'nope', { dtype: 'f32' })).rejects.toThrow(
        /model\.safetensors, tensor "nope"/,
      );
      await expect(uploadTensor(ctx, file, 'ids', { dtype: 'f32' })).rejects.toThrow(/ids/);
      await expect(uploadTensor(ctx, file, 'conv.weight', { dtype: 'f32', shape: [4, 4] })).rejects.toThrow(
        /shape \[4, 4\] has 16 elements, but conv\.weight in model\.safetensors is \[3, 5\]/,
      );
      await expect(
        uploadTensor(ctx, file, 'conv.weight', { dtype: 'f32', transform: (d) => d.subarray(1) }),
      ).rejects.toThrow(/returned 14 values, expected 15/);
    });
  });
});

describe('uploadSafetensorsStream', () => {
  it('uploads tensors from a one-shot stream as they arrive', async () => {
    const ctx = gpu();
    await gpuCase(ctx, 'stream', async () => {
      const progress: number[] = [];
      const choose: Record<string, UploadOptions> = {
        'x.f32': { dtype: 'f16', chunkBytes: 100, allowOverflow: true },
        'x.bf16': { dtype: 'f32' },
        'h.f16': { dtype: 'f16' },
      };
      const { header, tensors } = await uploadSafetensorsStream(
        ctx,
        new Blob([FILE as BlobPart]).stream(),
        (info) => choose[info.name],
        { file: 'model.safetensors', totalBytes: FILE.length, onProgress: (loaded) => progress.push(loaded) },
      );
      try {
        expect([...tensors.keys()].sort()).toEqual(['h.f16', 'x.bf16', 'x.f32']);
        expect(header.tensors.size).toBe(7);
        expectBits('stream x.f32 -> f16', await bits(tensors.get('x.f32') as Tensor), X_F16);
        expectBits('stream x.bf16 -> f32', await bits(tensors.get('x.bf16') as Tensor), BF16_F32);
        expectBits('stream h.f16 -> f16', await bits(tensors.get('h.f16') as Tensor), H);
        expect(progress.at(-1)).toBe(FILE.length);
      } finally {
        for (const t of tensors.values()) t.dispose();
      }
      // A stream that breaks off releases what it had uploaded.
      const cut = FILE.slice(0, FILE.length - 10);
      await expect(
        uploadSafetensorsStream(ctx, new Blob([cut as BlobPart]).stream(), (info) => choose[info.name]),
      ).rejects.toThrow(/stream ended/);
    });
  });
});
