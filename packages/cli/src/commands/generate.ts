import { type GenerateOptions, Generator } from '@webtune/models';
import { type FlagSpec, parseFlags } from '../args.js';
import { gpu, info, openAdapter, openModel, PRECISION_HELP, precisionFlag, tileMathFlag } from '../common.js';

export const generateFlags: Record<string, FlagSpec> = {
  model: { type: 'string', description: 'Hugging Face model folder, or a .gguf file', required: true },
  prompt: { type: 'string', description: 'text to continue (the tokenizer adds its BOS)', required: true },
  'max-new-tokens': { type: 'int', description: 'tokens to generate', default: 128 },
  temperature: { type: 'number', description: '0 = greedy (default: generation_config.json, else greedy)' },
  'top-p': { type: 'number', description: 'nucleus sampling threshold' },
  'top-k': { type: 'int', description: 'sample among the k most likely tokens' },
  seed: { type: 'int', description: 'sampling seed', default: 0 },
  precision: { type: 'string', description: PRECISION_HELP },
  adapter: { type: 'string', description: 'a PEFT LoRA adapter folder to apply' },
  'tile-math': {
    type: 'string',
    description:
      'f16 or f32: how the prefill and attention tiles are staged and multiplied (default: f16 on GPUs with shader-f16, else f32)',
  },
};

interface GenerationConfig {
  do_sample?: boolean;
  temperature?: number;
  top_p?: number;
  top_k?: number;
}

export async function generate(argv: string[]): Promise<void> {
  const f = parseFlags(argv, generateFlags, 'generate');
  const ctx = await gpu();
  const { source, model, tokenizer } = await openModel(ctx, f.model as string, precisionFlag(f.precision));
  // Sampling defaults follow the model's generation_config.json, as transformers' generate does.
  const gc = JSON.parse((await source.readText('generation_config.json')) ?? '{}') as GenerationConfig;
  const sample = gc.do_sample === true;
  const prompt = tokenizer.encode(f.prompt as string);
  const maxNew = f['max-new-tokens'] as number;
  const adapter = await openAdapter(ctx, model, f.adapter as string | undefined);
  const gen = await Generator.create(ctx, model, {
    maxSequence: Math.min(model.config.maxPositions, prompt.length + maxNew + 1),
    lora: adapter?.weights,
    ...tileMathFlag(f['tile-math']),
  });
  const decoder = tokenizer.streamDecoder({ context: prompt, skipSpecialTokens: true });
  const opts: GenerateOptions = {
    maxNewTokens: maxNew,
    temperature: (f.temperature as number | undefined) ?? (sample ? (gc.temperature ?? 1) : 0),
    topP: (f['top-p'] as number | undefined) ?? (sample ? gc.top_p : undefined),
    topK: (f['top-k'] as number | undefined) ?? (sample ? gc.top_k : undefined),
    seed: f.seed as number,
    stopTokens: [...tokenizer.eosTokenIds, ...model.config.eosTokenIds],
    onToken: (id) => process.stdout.write(decoder.push(id)),
  };
  const r = await gen.generate(prompt, opts);
  process.stdout.write(`${decoder.flush()}\n`);
  const tokS = r.ids.length > 1 ? (r.ids.length - 1) / r.decodeSeconds : 0;
  info(
    `${r.ids.length} tokens (${r.stopReason}); prefill ${prompt.length} tokens in ${r.prefillSeconds.toFixed(2)} s, decode ${tokS.toFixed(1)} tokens/s, ${gen.tileMath} tiles`,
  );
  gen.dispose();
  adapter?.dispose();
  model.dispose();
  ctx.destroy();
}
