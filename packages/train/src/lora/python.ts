/**
 * The few pieces of Python that PEFT's file format and messages depend on, done the way CPython
 * 3.11 does them:
 * - `json.dumps(obj, indent=2, sort_keys=True)` (ensure_ascii, floats through `float.__repr__`),
 *   which is how PEFT writes adapter_config.json. JSON numbers do not say whether they are ints or
 *   floats, so a float is marked by wrapping it in PyFloat.
 * - `repr()` of str, int, list and set, as PEFT's error and warning messages print them.
 * - Python `re` patterns run by JavaScript's RegExp (target_modules, rank_pattern keys, ...).
 */

/** A number that Python holds as a float: written "8.0", not "8". */
export class PyFloat {
  constructor(readonly value: number) {}
}

export type PyJson =
  | null
  | boolean
  | number
  | string
  | PyFloat
  | readonly PyJson[]
  | { readonly [key: string]: PyJson };

/** `repr(float)`: the shortest digits that read back as the same double, in fixed notation when
 * the decimal exponent is in [-4, 16) and in scientific notation (two-digit exponent at least)
 * otherwise; a whole number keeps ".0". */
export function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return 'nan';
  if (x === Number.POSITIVE_INFINITY) return 'inf';
  if (x === Number.NEGATIVE_INFINITY) return '-inf';
  const sign = x < 0 || Object.is(x, -0) ? '-' : '';
  const a = Math.abs(x);
  if (a === 0) return `${sign}0.0`;
  const [mantissa, exp] = a.toExponential().split('e') as [string, string];
  const digits = mantissa.replace('.', '');
  const e = Number(exp);
  if (e < -4 || e >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    const ee = Math.abs(e);
    return `${sign}${m}e${e < 0 ? '-' : '+'}${ee < 10 ? `0${ee}` : ee}`;
  }
  if (e < 0) return `${sign}0.${'0'.repeat(-e - 1)}${digits}`;
  const intPart = digits.length > e + 1 ? digits.slice(0, e + 1) : digits.padEnd(e + 1, '0');
  const frac = digits.length > e + 1 ? digits.slice(e + 1) : '0';
  return `${sign}${intPart}.${frac}`;
}

/** `json.dumps(str)` with ensure_ascii: everything outside printable ASCII as \uXXXX (UTF-16
 * units), the usual short escapes for \" \\ \n \r \t \b \f. */
export function pyJsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const ch = s[i] as string;
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (c < 0x20 || c > 0x7e) out += `\\u${c.toString(16).padStart(4, '0')}`;
    else out += ch;
  }
  return `${out}"`;
}

/** Python orders str keys by code point; JavaScript's default sort uses UTF-16 units. */
function compareCodePoints(a: string, b: string): number {
  const ca = Array.from(a, (ch) => ch.codePointAt(0) as number);
  const cb = Array.from(b, (ch) => ch.codePointAt(0) as number);
  const n = Math.min(ca.length, cb.length);
  for (let i = 0; i < n; i++) {
    const d = (ca[i] as number) - (cb[i] as number);
    if (d !== 0) return d;
  }
  return ca.length - cb.length;
}

/** `json.dumps(value, indent=indent, sort_keys=sortKeys)`. Numbers must be integers unless
 * wrapped in PyFloat (a plain non-integer number is written as a float too). */
export function pyJsonDumps(value: PyJson, options: { indent?: number; sortKeys?: boolean } = {}): string {
  const indent = options.indent ?? 2;
  const sortKeys = options.sortKeys ?? true;
  const write = (v: PyJson, level: number): string => {
    if (v === null) return 'null';
    if (v === true) return 'true';
    if (v === false) return 'false';
    if (v instanceof PyFloat) return pyFloatRepr(v.value);
    if (typeof v === 'number') {
      if (!Number.isInteger(v)) return pyFloatRepr(v);
      if (!Number.isSafeInteger(v)) throw new RangeError(`${v} is not a safe integer`);
      return Object.is(v, -0) ? '0' : String(v);
    }
    if (typeof v === 'string') return pyJsonString(v);
    const pad = ' '.repeat(indent * (level + 1));
    const end = ' '.repeat(indent * level);
    if (Array.isArray(v)) {
      if (v.length === 0) return '[]';
      return `[\n${v.map((x) => pad + write(x, level + 1)).join(',\n')}\n${end}]`;
    }
    const entries = Object.entries(v as { readonly [key: string]: PyJson });
    if (entries.length === 0) return '{}';
    if (sortKeys) entries.sort(([a], [b]) => compareCodePoints(a, b));
    return `{\n${entries.map(([k, x]) => `${pad}${pyJsonString(k)}: ${write(x, level + 1)}`).join(',\n')}\n${end}}`;
  };
  return write(value, 0);
}

/** `repr(str)`: single quotes unless the text has ' and no ", backslashes and control characters
 * escaped. */
export function pyStrRepr(s: string): string {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of s) {
    const c = ch.codePointAt(0) as number;
    if (ch === quote || ch === '\\') out += `\\${ch}`;
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (c < 0x20 || c === 0x7f) out += `\\x${c.toString(16).padStart(2, '0')}`;
    else out += ch;
  }
  return out + quote;
}

/** `repr()` of an int, a str, or a list of them. */
export function pyRepr(value: number | string | readonly (number | string)[]): string {
  if (typeof value === 'number') return String(value);
  if (typeof value === 'string') return pyStrRepr(value);
  return `[${value.map((v) => pyRepr(v)).join(', ')}]`;
}

/** `repr(set_of_str)` with the elements sorted (a Python set prints in hash order, which changes
 * from run to run). */
export function pySetRepr(values: Iterable<string>): string {
  const sorted = [...values].sort(compareCodePoints);
  return sorted.length === 0 ? 'set()' : `{${sorted.map(pyStrRepr).join(', ')}}`;
}

export { compareCodePoints };

/**
 * A Python `re` pattern as a JavaScript RegExp source, or throws SyntaxError. Translates what
 * differs between the two for patterns of module names: named groups `(?P<n>...)` and `(?P=n)`,
 * `\A` and `\Z`, and leading global flags `(?i)`, `(?s)`, `(?m)` (`(?a)`, `(?u)` change nothing for
 * ASCII names). Everything else is passed through and must compile in JavaScript.
 */
export function translatePythonRegex(pattern: string): { source: string; flags: string } {
  let flags = '';
  let rest = pattern;
  for (;;) {
    const m = /^\(\?([aiLmsux]+)\)/.exec(rest);
    if (!m) break;
    for (const f of m[1] as string) {
      if (f === 'i' || f === 's' || f === 'm') {
        if (!flags.includes(f)) flags += f;
      } else if (f === 'x' || f === 'L') {
        throw new SyntaxError(`the Python flag (?${f}) has no JavaScript equivalent`);
      }
    }
    rest = rest.slice(m[0].length);
  }
  let out = '';
  let inClass = false;
  for (let i = 0; i < rest.length; i++) {
    const ch = rest[i] as string;
    if (ch === '\\') {
      const next = rest[i + 1];
      if (next === undefined) throw new SyntaxError('the pattern ends with a lone backslash');
      if (!inClass && next === 'A') out += '^';
      else if (!inClass && next === 'Z') out += '$';
      else out += ch + next;
      i++;
      continue;
    }
    if (inClass) {
      if (ch === ']') inClass = false;
      out += ch;
      continue;
    }
    if (ch === '[') {
      inClass = true;
      out += ch;
      // A ']' right after '[' or '[^' is a literal in Python; JavaScript needs it escaped.
      if (rest[i + 1] === '^') {
        out += '^';
        i++;
      }
      if (rest[i + 1] === ']') {
        out += '\\]';
        i++;
      }
      continue;
    }
    if (rest.startsWith('(?P<', i)) {
      out += '(?<';
      i += 3;
      continue;
    }
    if (rest.startsWith('(?P=', i)) {
      const close = rest.indexOf(')', i);
      if (close < 0) throw new SyntaxError('unterminated (?P=name)');
      out += `\\k<${rest.slice(i + 4, close)}>`;
      i = close;
      continue;
    }
    if (rest.startsWith('(?', i) && /^\(\?[aiLmsux-]+[:)]/.test(rest.slice(i))) {
      throw new SyntaxError('inline flags inside the pattern have no JavaScript equivalent');
    }
    out += ch;
  }
  return { source: out, flags };
}

/** A compiled Python pattern, anchored as `re.fullmatch` (mode 'fullmatch') or as `re.match`
 * (mode 'match': anchored at the start only). `wrap` builds the Python-level pattern around the
 * translated one (for PEFT's rf"(.*\.)?({key})$" and similar). */
export function pythonRegex(pattern: string, mode: 'fullmatch' | 'match', wrap?: (source: string) => string): RegExp {
  const { source, flags } = translatePythonRegex(pattern);
  // Python accepts global flags only at the very start of the whole expression.
  if (wrap && flags) throw new SyntaxError('global flags not at the start of the expression');
  const body = wrap ? wrap(source) : source;
  return new RegExp(mode === 'fullmatch' ? `^(?:${body})$` : `^(?:${body})`, flags);
}
