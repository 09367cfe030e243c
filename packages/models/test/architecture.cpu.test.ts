// The module list and parameter tables against the real transformers classes (module lists
// dumped by tools/golden_peft_config.py), and config.json validation.
import { describe, expect, it } from 'vitest';
import { linearModules, namedModules, parameterCount } from '../src/architecture.js';
import { ConfigError, parseModelConfig } from '../src/config.js';
import { FIXTURES, fixturePath, repoSource } from './fixtures.js';

const peftGoldens = import.meta.glob<{
  modules: { name: string; kind: string; in?: number; out?: number; layer?: number }[];
}>('../../train/test/golden/peft-config/tiny-*.json', { import: 'default' });

async function config(name: string) {
  const source = await repoSource(fixturePath(name as (typeof FIXTURES)[number]));
  return parseModelConfig(JSON.parse((await source.readText('config.json')) as string), name);
}

describe('named modules', () => {
  for (const name of FIXTURES.filter((f) => f.startsWith('tiny-'))) {
    it(`${name} lists the modules transformers builds`, async () => {
      const golden = await (
        peftGoldens[`../../train/test/golden/peft-config/${name}.json`] as () => Promise<{
          modules: { name: string; kind: string; in?: number; out?: number; layer?: number }[];
        }>
      )();
      const c = await config(name);
      const mine = namedModules(c).map((m) => ({
        name: m.name,
        kind: m.kind,
        in: m.inFeatures,
        out: m.outFeatures,
        layer: m.layer,
      }));
      expect(mine).toEqual(
        golden.modules.map((m) => ({ name: m.name, kind: m.kind, in: m.in, out: m.out, layer: m.layer })),
      );
      expect(linearModules(c).length).toBe(
        golden.modules.filter((m) => m.kind === 'linear' || m.kind === 'conv1d').length,
      );
    });
  }

  it('counts stories260K parameters', async () => {
    expect(parameterCount(await config('stories260K'))).toBe(260_032);
  });
});

describe('config.json validation', () => {
  const llama = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: 32,
    hidden_size: 16,
    intermediate_size: 20,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    max_position_embeddings: 64,
  };
  it('names the unsupported architecture and lists the supported ones', () => {
    expect(() => parseModelConfig({ ...llama, architectures: ['MistralForCausalLM'] })).toThrow(
      /MistralForCausalLM.*supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel/,
    );
  });
  it('names missing and malformed fields', () => {
    const { hidden_size: _, ...noHidden } = llama;
    expect(() => parseModelConfig(noHidden, 'x/config.json')).toThrow(/x\/config.json: hidden_size: is missing/);
    expect(() => parseModelConfig({ ...llama, num_attention_heads: 2.5 })).toThrow(ConfigError);
    expect(() => parseModelConfig({ ...llama, num_key_value_heads: 3 })).toThrow(/does not divide/);
  });
  it('refuses settings that would silently compute a different model', () => {
    expect(() => parseModelConfig({ ...llama, hidden_act: 'gelu' })).toThrow(/hidden_act.*not supported/);
    expect(() => parseModelConfig({ ...llama, rope_scaling: { rope_type: 'yarn', factor: 4 } })).toThrow(
      /yarn.*supported: "default", "llama3"/,
    );
    expect(() => parseModelConfig({ ...llama, architectures: ['Qwen2ForCausalLM'], use_sliding_window: true })).toThrow(
      /sliding-window/,
    );
  });
  it('reads transformers 5 rope_parameters as well as rope_theta', () => {
    const c = parseModelConfig({ ...llama, rope_parameters: { rope_type: 'default', rope_theta: 500000 } });
    expect(c.rope?.theta).toBe(500000);
  });
});
