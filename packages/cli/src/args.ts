/** A small, strict parser for `--flag value` / `--flag=value` / `--switch` arguments. */
import { WebtuneError } from '@webtune/core';

export class UsageError extends WebtuneError {}

export interface FlagSpec {
  readonly type: 'string' | 'number' | 'int' | 'boolean';
  readonly description: string;
  readonly default?: string | number | boolean;
  readonly required?: boolean;
}

export type Flags = Record<string, string | number | boolean | undefined>;

export function parseFlags(argv: readonly string[], specs: Readonly<Record<string, FlagSpec>>, command: string): Flags {
  const out: Flags = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (!arg.startsWith('--')) throw new UsageError(`${command}: unexpected argument ${JSON.stringify(arg)}`);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq === -1 ? undefined : eq);
    const spec = specs[name];
    if (!spec)
      throw new UsageError(
        `${command}: unknown option --${name} (options: ${Object.keys(specs)
          .map((k) => `--${k}`)
          .join(', ')})`,
      );
    let raw: string | undefined;
    if (spec.type === 'boolean') {
      raw = eq === -1 ? 'true' : arg.slice(eq + 1);
      if (raw !== 'true' && raw !== 'false')
        throw new UsageError(`${command}: --${name} takes no value (or =true/=false)`);
      out[name] = raw === 'true';
      continue;
    }
    raw = eq === -1 ? argv[++i] : arg.slice(eq + 1);
    if (raw === undefined) throw new UsageError(`${command}: --${name} needs a value`);
    if (spec.type === 'string') out[name] = raw;
    else {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || (spec.type === 'int' && !Number.isSafeInteger(n))) {
        throw new UsageError(
          `${command}: --${name} must be ${spec.type === 'int' ? 'an integer' : 'a number'}, got ${JSON.stringify(raw)}`,
        );
      }
      out[name] = n;
    }
  }
  for (const [name, spec] of Object.entries(specs)) {
    if (out[name] === undefined && spec.default !== undefined) out[name] = spec.default;
    if (out[name] === undefined && spec.required)
      throw new UsageError(`${command}: --${name} is required (${spec.description})`);
  }
  return out;
}

export function usage(command: string, summary: string, specs: Readonly<Record<string, FlagSpec>>): string {
  const lines = Object.entries(specs).map(([name, s]) => {
    const value = s.type === 'boolean' ? '' : ` <${s.type === 'string' ? 'value' : s.type}>`;
    const def = s.default !== undefined ? ` (default ${String(s.default)})` : s.required ? ' (required)' : '';
    return `${`  --${name}${value}`.padEnd(30)}${s.description}${def}`;
  });
  return `webtune ${command}: ${summary}\n${lines.join('\n')}`;
}
