import { readFile } from 'node:fs/promises';
import { evaluateLoss } from '@webtune/models';
import { textWindows } from '@webtune/train';
import { type FlagSpec, parseFlags, UsageError } from '../args.js';
import { gpu, info, openAdapter, openModel, PRECISION_HELP, precisionFlag, userPath } from '../common.js';

export const evalFlags: Record<string, FlagSpec> = {
  model: { type: 'string', description: 'Hugging Face model folder, or a .gguf file', required: true },
  data: { type: 'string', description: 'plain text file', required: true },
  seq: { type: 'int', description: 'tokens per window', default: 256 },
  batch: { type: 'int', description: 'windows per forward pass', default: 8 },
  precision: { type: 'string', description: PRECISION_HELP },
  adapter: { type: 'string', description: 'a PEFT LoRA adapter folder to apply' },
  json: { type: 'boolean', description: 'print one line {"loss", "tokens", "perplexity"}', default: false },
};

export async function evaluate(argv: string[]): Promise<void> {
  const f = parseFlags(argv, evalFlags, 'eval');
  const seq = f.seq as number;
  if (seq < 2) throw new UsageError(`eval: --seq must be at least 2, got ${seq}`);
  const path = userPath(f.data as string);
  const text = await readFile(path, 'utf8');
  const ctx = await gpu();
  const { model, tokenizer } = await openModel(ctx, f.model as string, precisionFlag(f.precision));
  if (seq > model.config.maxPositions)
    throw new UsageError(`eval: --seq ${seq} exceeds the model's context of ${model.config.maxPositions}`);
  const adapter = await openAdapter(ctx, model, f.adapter as string | undefined);
  const w = textWindows(tokenizer, text, seq);
  info(`${path}: ${w.textTokens} tokens, ${w.windows} windows of ${seq}`);
  const t0 = performance.now();
  const r = await evaluateLoss(ctx, model, w.examples, {
    batch: f.batch as number,
    lora: adapter?.weights,
    onProgress: (done, total) => info(`  ${done}/${total} positions`),
  });
  const seconds = (performance.now() - t0) / 1000;
  if (f.json) console.log(JSON.stringify({ loss: r.loss, tokens: r.tokens, perplexity: r.perplexity }));
  else
    console.log(
      `loss ${r.loss.toFixed(6)}  perplexity ${r.perplexity.toFixed(3)}  over ${r.tokens} predicted tokens (${(r.tokens / seconds).toFixed(0)} tokens/s)`,
    );
  adapter?.dispose();
  model.dispose();
  ctx.destroy();
}
