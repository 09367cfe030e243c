// mergeAdapter writing folders on disk (directorySink): a single-file and a sharded copy of
// tiny-llama, with the PEFT-saved adapter tiny-llama-A. The sharded input comes out sharded the
// same way (same shard names, index copied), tensor for tensor equal to the single-file merge, and
// both folders load in webtune with the loss of the base model + adapter.
import { mkdtempSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  directorySource,
  evaluateLoss,
  loadModel,
  loadModelConfig,
  namedModules,
  parseSafetensorsHeader,
  serializeSafetensors,
} from '@webtune/models';
import { afterAll, describe, expect, it } from 'vitest';
import { gpuCase, useGpu } from '../../core/test/gpu.js';
import { loadAdapter } from '../src/adapter.js';
import { readPeftAdapter } from '../src/lora/index.js';
import { directorySink, mergeAdapter } from '../src/merge.js';

const gpu = useGpu();
const root = fileURLToPath(new URL('../../../', import.meta.url));
const baseDir = join(root, 'packages/models/test/fixtures/tiny-llama');
const adapterDir = join(root, 'packages/train/test/golden/peft-train/tiny-llama-A/adapter');
const work = mkdtempSync(join(tmpdir(), 'webtune-merge-'));
afterAll(() => rm(work, { recursive: true, force: true }));

interface Golden {
  batch: { input_ids: number[][]; labels: number[][] };
  adapter: { loss: number };
}

/** Writes tiny-llama as two shards + model.safetensors.index.json, with its side files. */
async function shardedCopy(dir: string): Promise<string[]> {
  await mkdir(dir, { recursive: true });
  const bytes = new Uint8Array(await readFile(join(baseDir, 'model.safetensors')));
  const header = parseSafetensorsHeader(bytes, 'model.safetensors');
  const tensors = [...header.tensors.values()];
  const half = Math.ceil(tensors.length / 2);
  const shards = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'];
  const weightMap: Record<string, string> = {};
  for (const [s, part] of [tensors.slice(0, half), tensors.slice(half)].entries()) {
    const name = shards[s] as string;
    const file = serializeSafetensors(
      part.map((t) => ({
        name: t.name,
        dtype: t.dtype as 'F32',
        shape: t.shape,
        bytes: bytes.subarray(t.begin, t.end),
      })),
      { format: 'pt' },
    );
    await writeFile(join(dir, name), file);
    for (const t of part) weightMap[t.name] = name;
  }
  const index = `${JSON.stringify({ metadata: { total_size: header.fileSize - header.dataStart }, weight_map: weightMap }, null, 2)}\n`;
  await writeFile(join(dir, 'model.safetensors.index.json'), index);
  for (const f of await readdir(baseDir)) {
    if (f !== 'model.safetensors') await writeFile(join(dir, f), await readFile(join(baseDir, f)));
  }
  return shards;
}

describe('mergeAdapter into folders', () => {
  it('single-file and sharded checkpoints', async () => {
    const ctx = gpu();
    const g = JSON.parse(
      await readFile(join(root, 'packages/train/test/golden/peft-train/tiny-llama-A/golden.json'), 'utf8'),
    ) as Golden;
    const shardedBase = join(work, 'sharded-base');
    const shards = await shardedCopy(shardedBase);
    const config = await loadModelConfig(directorySource(baseDir));
    const imported = await readPeftAdapter(directorySource(adapterDir), namedModules(config), config.modelType);

    const single = join(work, 'merged');
    const sharded = join(work, 'merged-sharded');
    const r1 = await mergeAdapter(directorySource(baseDir), imported, directorySink(single));
    const progress: number[] = [];
    const r2 = await mergeAdapter(directorySource(shardedBase), imported, directorySink(sharded), {
      chunkBytes: 4096,
      onProgress: (p) => progress.push(p.written),
    });
    expect(r1.files[0]).toBe('model.safetensors');
    expect(r2.files.slice(0, 3)).toEqual([...shards, 'model.safetensors.index.json']);
    expect(progress.at(-1)).toBe(r2.weightBytes);
    // Everything but the base's model card, which would describe the wrong model.
    expect((await readdir(sharded)).sort()).toEqual(
      (await readdir(shardedBase)).filter((f) => f !== 'README.md').sort(),
    );
    expect(await readFile(join(sharded, 'model.safetensors.index.json'), 'utf8')).toBe(
      await readFile(join(shardedBase, 'model.safetensors.index.json'), 'utf8'),
    );

    // Tensor for tensor, the sharded merge equals the single-file one.
    const one = new Uint8Array(await readFile(join(single, 'model.safetensors')));
    const oneHeader = parseSafetensorsHeader(one, 'model.safetensors');
    let compared = 0;
    for (const shard of shards) {
      const bytes = new Uint8Array(await readFile(join(sharded, shard)));
      for (const t of parseSafetensorsHeader(bytes, shard).tensors.values()) {
        const u = oneHeader.tensors.get(t.name);
        expect(u, t.name).toBeDefined();
        expect(bytes.subarray(t.begin, t.end), t.name).toEqual(one.subarray(u?.begin, u?.end));
        compared++;
      }
    }
    expect(compared).toBe(oneHeader.tensors.size);

    const examples = g.batch.input_ids.map((ids, b) => ({ inputIds: ids, labels: g.batch.labels[b] as number[] }));
    const losses = await gpuCase(ctx, 'merged folders', async () => {
      const out: Record<string, number> = {};
      const model = await loadModel(ctx, directorySource(baseDir), { precision: 'f32' });
      const adapter = await loadAdapter(ctx, model, directorySource(adapterDir));
      out.adapter = (await evaluateLoss(ctx, model, examples, { batch: 2, lora: adapter.weights })).loss;
      adapter.dispose();
      model.dispose();
      for (const [name, dir] of [
        ['single', single],
        ['sharded', sharded],
      ] as const) {
        const m = await loadModel(ctx, directorySource(dir), { precision: 'f32' });
        out[name] = (await evaluateLoss(ctx, m, examples, { batch: 2 })).loss;
        m.dispose();
      }
      return out;
    });
    for (const name of ['single', 'sharded']) {
      expect(Math.abs((losses[name] as number) - (losses.adapter as number)) / (losses.adapter as number)).toBeLessThan(
        1e-5,
      );
    }
    expect(Math.abs((losses.single as number) - g.adapter.loss) / g.adapter.loss).toBeLessThan(1e-4);
    console.log(`tiny-llama-A merged: ${JSON.stringify(losses)}, PEFT ${g.adapter.loss}`);
  });

  it("GPT-2 checkpoints without the 'transformer.' prefix", async () => {
    const gpt2 = join(root, 'packages/models/test/fixtures/tiny-gpt2');
    const bare = join(work, 'gpt2-bare');
    await mkdir(bare, { recursive: true });
    const bytes = new Uint8Array(await readFile(join(gpt2, 'model.safetensors')));
    const header = parseSafetensorsHeader(bytes, 'model.safetensors');
    const renamed = [...header.tensors.values()].map((t) => ({
      name: t.name.replace(/^transformer\./, ''),
      dtype: t.dtype as 'F32',
      shape: t.shape,
      bytes: bytes.subarray(t.begin, t.end),
    }));
    expect(renamed.some((t) => t.name === 'h.0.attn.c_attn.weight')).toBe(true);
    await writeFile(join(bare, 'model.safetensors'), serializeSafetensors(renamed, header.metadata));
    await writeFile(join(bare, 'config.json'), await readFile(join(gpt2, 'config.json')));
    const config = await loadModelConfig(directorySource(gpt2));
    const imported = await readPeftAdapter(
      directorySource(join(root, 'packages/train/test/golden/peft-train/tiny-gpt2-B/adapter')),
      namedModules(config),
      config.modelType,
    );
    const a = join(work, 'gpt2-merged');
    const b = join(work, 'gpt2-bare-merged');
    await mergeAdapter(directorySource(gpt2), imported, directorySink(a));
    const r = await mergeAdapter(directorySource(bare), imported, directorySink(b));
    expect(r.merged).toContain('h.0.attn.c_attn.weight');
    expect(r.merged.length).toBe(8);
    const one = new Uint8Array(await readFile(join(a, 'model.safetensors')));
    const two = new Uint8Array(await readFile(join(b, 'model.safetensors')));
    const h1 = parseSafetensorsHeader(one, 'a');
    for (const t of parseSafetensorsHeader(two, 'b').tensors.values()) {
      const u = h1.tensors.get(`transformer.${t.name}`);
      expect(two.subarray(t.begin, t.end), t.name).toEqual(one.subarray(u?.begin, u?.end));
    }
  });

  it('refuses an adapter made for another model, naming the module and both shapes', async () => {
    const llama = await loadModelConfig(directorySource(baseDir));
    const other = join(root, 'packages/train/test/golden/peft-train/tiny-llama3-A/adapter');
    const llama3 = await loadModelConfig(directorySource(join(root, 'packages/models/test/fixtures/tiny-llama3')));
    const imported = await readPeftAdapter(directorySource(other), namedModules(llama3), llama3.modelType);
    expect(llama.hiddenSize).not.toBe(llama3.hiddenSize);
    await expect(mergeAdapter(directorySource(baseDir), imported, directorySink(join(work, 'bad')))).rejects.toThrow(
      /model\.layers\.0\.self_attn\.q_proj.*\[out 64, in 64\].*\[out 48, in 48\]/,
    );
  });
});
