/**
 * The start page: the embedded model generating, a LoRA adapter trained in the tab, the kernel
 * checks and a quick benchmark, all on this browser's WebGPU. (The full studio builds on this.)
 */
import {
  createGpuContext,
  describeAdapter,
  formatBytes,
  type GpuContext,
  type Tensor,
  tensorFromData,
  WebGpuUnavailableError,
} from '@webtune/core';
import {
  type CausalLM,
  Generator,
  type LoraWeightsByModule,
  loadModel,
  loadTokenizer,
  type Tokenizer,
  urlSource,
} from '@webtune/models';
import { DataLoader, LoraTrainer, padIdOf, prepareDataset } from '@webtune/train';
import { runKernelBenchmarks } from '../../../bench/kernels.js';
import { runChecks } from './checks.js';

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const button = (id: string) => $<HTMLButtonElement>(id);

interface Session {
  ctx: GpuContext;
  model: CausalLM;
  tokenizer: Tokenizer;
  adapter?: LoraWeightsByModule;
}

let session: Session | undefined;
let busy = false;

/** Runs one action at a time, with every button disabled meanwhile and errors shown in `out`. */
async function exclusive(out: HTMLElement, action: () => Promise<void>): Promise<void> {
  if (busy) return;
  busy = true;
  for (const b of document.querySelectorAll('button')) b.disabled = true;
  try {
    await action();
  } catch (e) {
    out.textContent += `\nerror: ${e instanceof Error ? e.message : String(e)}`;
    console.error(e);
  } finally {
    busy = false;
    for (const b of document.querySelectorAll('button')) b.disabled = false;
  }
}

async function generate(s: Session, adapter: LoraWeightsByModule | undefined, out: HTMLElement): Promise<void> {
  const prompt = $<HTMLInputElement>('prompt').value;
  const maxNewTokens = Number($<HTMLInputElement>('max-tokens').value);
  const temperature = Number($<HTMLInputElement>('temperature').value);
  const ids = s.tokenizer.encode(prompt);
  const gen = await Generator.create(s.ctx, s.model, {
    maxSequence: Math.min(s.model.config.maxPositions, ids.length + maxNewTokens + 1),
    lora: adapter,
  });
  const decoder = s.tokenizer.streamDecoder({ context: ids, skipSpecialTokens: true });
  out.textContent = prompt;
  try {
    const r = await gen.generate(ids, {
      maxNewTokens,
      temperature,
      seed: 1,
      onToken: (id) => (out.textContent += decoder.push(id)),
    });
    out.textContent += decoder.flush();
    out.dataset.done = 'true';
    const tokS = r.ids.length > 1 ? (r.ids.length - 1) / r.decodeSeconds : 0;
    out.title = `${r.ids.length} tokens, ${tokS.toFixed(1)} tokens/s`;
  } finally {
    gen.dispose();
  }
}

async function train(s: Session, out: HTMLElement): Promise<void> {
  const steps = Number($<HTMLInputElement>('train-steps').value);
  const text = $<HTMLTextAreaElement>('train-text').value;
  const seq = 64;
  const data = prepareDataset(s.tokenizer, text, { file: 'pasted text', seq, format: 'text' });
  const batch = Math.min(4, data.examples.length);
  const trainer = await LoraTrainer.create(s.ctx, s.model, {
    lora: { r: 8, lora_alpha: 16 },
    batch,
    seq,
    optimizer: { lr: 3e-3 },
    schedule: { kind: 'linear', warmupSteps: 0, totalSteps: steps },
  });
  out.textContent = `${data.stats.examples} windows, ${data.stats.trainedTokens} trained tokens; GPU memory ${formatBytes(trainer.memory.total)}\n`;
  const loader = new DataLoader(data.examples, { batch, seq, padId: padIdOf(s.tokenizer) });
  for (let i = 0; i < steps; i++) {
    const b = loader.next();
    if (!b) break;
    const r = await trainer.trainStep([{ inputIds: b.inputIds, labels: b.labels }]);
    out.textContent += `step ${r.step}  loss ${r.loss.toFixed(4)}  ${(r.positions / r.seconds).toFixed(0)} tokens/s\n`;
  }
  // Keep the trained adapter for generation: copy it out of the trainer before disposing it.
  const weights = await trainer.readWeights();
  const adapter = new Map<string, { a: Tensor; b: Tensor; scale: number }>();
  for (const m of trainer.resolved.modules) {
    const w = weights.get(m.name);
    if (!w) continue;
    adapter.set(m.name, {
      a: tensorFromData(s.ctx, w.a, [...m.aShape], 'f32', `${m.name}.lora_A`),
      b: tensorFromData(s.ctx, w.b, [...m.bShape], 'f32', `${m.name}.lora_B`),
      scale: m.scale,
    });
  }
  trainer.dispose();
  for (const old of s.adapter?.values() ?? []) {
    old.a.dispose();
    old.b.dispose();
  }
  s.adapter = adapter;
  out.textContent += 'with the adapter: ';
  const sample = document.createElement('span');
  out.append(sample);
  await generate(s, adapter, sample);
  out.dataset.done = 'true';
}

async function main(): Promise<void> {
  let ctx: GpuContext;
  try {
    ctx = await createGpuContext({ label: 'studio' });
  } catch (e) {
    $('gpu').textContent = e instanceof WebGpuUnavailableError ? e.message : `WebGPU failed: ${String(e)}`;
    return;
  }
  $('gpu').textContent = `GPU: ${describeAdapter(ctx)}`;
  ctx.lost.then((e) => ($('gpu').textContent = e.message));

  button('checks').disabled = false;
  button('checks').onclick = () =>
    exclusive($('checks-table'), async () => {
      const body = $('checks-table').querySelector('tbody') as HTMLTableSectionElement;
      body.textContent = '';
      const ok = await runChecks(ctx, (r) => {
        const row = body.insertRow();
        row.insertCell().textContent = r.name;
        row.insertCell().textContent = r.maxAbs.toExponential(2);
        const cell = row.insertCell();
        cell.textContent = r.ok ? 'pass' : 'FAIL';
        cell.className = r.ok ? 'pass' : 'fail';
      });
      $('checks-table').dataset.result = ok ? 'pass' : 'fail';
    });
  button('bench').disabled = false;
  button('bench').onclick = () =>
    exclusive($('bench-table'), async () => {
      const body = $('bench-table').querySelector('tbody') as HTMLTableSectionElement;
      body.textContent = '';
      await runKernelBenchmarks(ctx, {
        adapter: describeAdapter(ctx),
        quick: true,
        status: () => {},
        report: (r) => {
          const row = body.insertRow();
          for (const c of [
            r.name,
            r.shape,
            r.ms.toFixed(2),
            r.gflops?.toFixed(2) ?? '',
            r.baseline ?? '',
            r.ratio?.toFixed(2) ?? '',
          ])
            row.insertCell().textContent = c;
        },
      });
    });

  const source = urlSource(new URL('models/stories260K/', location.href).href);
  const [tokenizer, model] = await Promise.all([loadTokenizer(source), loadModel(ctx, source)]);
  session = { ctx, model, tokenizer };
  const s = session;
  for (const id of ['generate', 'train']) button(id).disabled = false;
  button('generate').onclick = () => exclusive($('output'), () => generate(s, s.adapter, $('output')));
  button('train').onclick = () => exclusive($('train-log'), () => train(s, $('train-log')));
  document.body.dataset.ready = 'true';
}

void main();
