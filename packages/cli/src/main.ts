/**
 * webtune's command line: the same engine as the browser, under Node through the `webgpu`
 * package (Dawn). Run from the repository as `pnpm webtune <command>`.
 */
import { WebtuneError } from '@webtune/core';
import { UsageError, usage } from './args.js';
import { evalFlags, evaluate } from './commands/eval.js';
import { exportCommand, exportFlags } from './commands/export.js';
import { generate, generateFlags } from './commands/generate.js';
import { inspect, inspectFlags } from './commands/inspect.js';
import { train, trainFlags } from './commands/train.js';

const commands = {
  inspect: { run: inspect, flags: inspectFlags, summary: 'architecture, parameters, memory, and the GPU found' },
  generate: { run: generate, flags: generateFlags, summary: 'continue a prompt (the prompt is not repeated)' },
  eval: { run: evaluate, flags: evalFlags, summary: 'mean cross-entropy of the model over a text file' },
  train: { run: train, flags: trainFlags, summary: 'train a LoRA adapter and write it in the PEFT format' },
  export: {
    run: exportCommand,
    flags: exportFlags,
    summary: 'merge an adapter into its model (--merge), or rewrite it for llama.cpp (--llama-cpp)',
  },
} as const;

function help(): string {
  return [
    'usage: webtune <command> [options]',
    '',
    ...Object.entries(commands).map(([name, c]) => usage(name, c.summary, c.flags)),
  ].join('\n\n');
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === 'help') {
    console.log(help());
    return name ? 0 : 1;
  }
  const command = commands[name as keyof typeof commands];
  if (!command) {
    console.error(`unknown command ${JSON.stringify(name)}\n\n${help()}`);
    return 1;
  }
  if (rest.includes('--help')) {
    console.log(usage(name, command.summary, command.flags));
    return 0;
  }
  // A command may return its exit status (train: 130 when Ctrl-C stopped it with a checkpoint).
  const code: unknown = await command.run(rest);
  return typeof code === 'number' ? code : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    // Our own errors carry everything a person needs; anything else is a bug: show the stack.
    if (e instanceof WebtuneError) console.error(`webtune: ${e.message}`);
    else console.error(e);
    process.exit(e instanceof UsageError ? 2 : 1);
  },
);
