/**
 * One entry point's own WGSL: the module's directives and only the declarations the entry point
 * reaches, with its override constants written in as `const`. The dispatch_cost benchmark builds a
 * pipeline from it to test whether a driver charges each dispatch by the size of the module it
 * came from (on Chromium's compatibility adapter over lavapipe it does not: the pruned matmul
 * costs what the planned one does). Declarations are found by their braces and semicolons and
 * what they reach by the names they mention, which over-includes at worst.
 */

/** A top-level declaration of a WGSL module, its text and the name it declares (none for directives). */
interface Declaration {
  readonly text: string;
  readonly name?: string;
  readonly kind: 'directive' | 'fn' | 'struct' | 'var' | 'const' | 'override' | 'alias' | 'const_assert';
}

const IDENT = /[A-Za-z_][A-Za-z0-9_]*/g;

/** Removes comments (line and nested block), keeping line breaks so positions stay readable. */
function stripComments(source: string): string {
  let out = '';
  let i = 0;
  while (i < source.length) {
    if (source.startsWith('//', i)) {
      const end = source.indexOf('\n', i);
      i = end < 0 ? source.length : end;
    } else if (source.startsWith('/*', i)) {
      let depth = 1;
      i += 2;
      while (i < source.length && depth > 0) {
        if (source.startsWith('/*', i)) {
          depth++;
          i += 2;
        } else if (source.startsWith('*/', i)) {
          depth--;
          i += 2;
        } else {
          if (source[i] === '\n') out += '\n';
          i++;
        }
      }
    } else {
      out += source[i];
      i++;
    }
  }
  return out;
}

/** Splits a comment-free module into its top-level declarations, in order. */
function splitDeclarations(source: string): Declaration[] {
  const decls: Declaration[] = [];
  let start = 0;
  let depth = 0;
  let paren = 0;
  for (let i = 0; i < source.length; i++) {
    const ch = source[i];
    if (ch === '(') paren++;
    else if (ch === ')') paren--;
    else if (ch === '{') depth++;
    else if (ch === '}') {
      depth--;
      // A function or struct body closes its declaration (a struct may still be followed by ';').
      if (depth === 0) {
        let end = i + 1;
        const rest = /^\s*;/.exec(source.slice(end));
        if (rest) end += rest[0].length;
        decls.push(classify(source.slice(start, end)));
        start = end;
        i = end - 1;
      }
    } else if (ch === ';' && depth === 0 && paren === 0) {
      decls.push(classify(source.slice(start, i + 1)));
      start = i + 1;
    }
  }
  if (source.slice(start).trim()) throw new Error(`WGSL ends inside a declaration: ${source.slice(start, start + 80)}`);
  return decls.filter((d) => d.text.trim() !== '' && d.text.trim() !== ';');
}

function classify(raw: string): Declaration {
  const text = raw.trim();
  // Attributes (@compute, @workgroup_size(…), @group(0) @binding(1), @id(…)) come first.
  const body = text.replace(/^(\s*@\w+\s*(\([^)]*\))?\s*)*/, '');
  const m =
    /^(fn|struct|var(?:\s*<[^>]*>)?|const_assert|const|override|alias)(?![A-Za-z0-9_])\s*([A-Za-z_][A-Za-z0-9_]*)?/.exec(
      body,
    );
  if (!m) return { text, kind: 'directive' };
  const word = (m[1] as string).startsWith('var') ? 'var' : (m[1] as string);
  if (word === 'const_assert') return { text, kind: 'const_assert' };
  if (!m[2]) throw new Error(`cannot read the name this WGSL declaration declares: ${text.slice(0, 80)}`);
  return { text, name: m[2], kind: word as Declaration['kind'] };
}

function identifiers(text: string): Set<string> {
  return new Set(text.match(IDENT) ?? []);
}

function wgslLiteral(value: number | boolean, type: string | undefined): string {
  if (typeof value === 'boolean') return String(value);
  if (type === 'bool') return String(value !== 0);
  if (type === 'u32') return `${Math.trunc(value)}u`;
  if (type === 'i32') return `${Math.trunc(value)}i`;
  if (type === 'f32') return `${Number.isInteger(value) ? value.toFixed(1) : String(value)}f`;
  if (type === 'f16') return `${String(value)}h`;
  return String(value);
}

/**
 * The module `source` reduced to what `entryPoint` reaches, with `constants` (and every other
 * override's default) written in as `const` declarations. Throws where the entry point is not in
 * the module or an override it reaches has neither a value nor a default.
 */
export function pruneWgsl(
  source: string,
  entryPoint: string,
  constants: Readonly<Record<string, number | boolean>> = {},
): string {
  const decls = splitDeclarations(stripComments(source));
  const byName = new Map<string, Declaration>();
  for (const d of decls) if (d.name) byName.set(d.name, d);
  const entry = byName.get(entryPoint);
  if (entry?.kind !== 'fn') throw new Error(`no entry point ${entryPoint} in the module`);
  const reached = new Set<string>([entryPoint]);
  const queue = [entry];
  for (let d = queue.pop(); d; d = queue.pop()) {
    for (const id of identifiers(d.text)) {
      const target = byName.get(id);
      if (target && !reached.has(id)) {
        reached.add(id);
        queue.push(target);
      }
    }
  }
  const out: string[] = [];
  for (const d of decls) {
    if (d.kind === 'directive') out.push(d.text);
    else if (d.kind === 'const_assert') {
      // Kept only where every name it reads is kept.
      const names = [...identifiers(d.text)].filter((id) => byName.has(id));
      if (names.every((id) => reached.has(id))) out.push(d.text);
    } else if (d.name && reached.has(d.name)) {
      if (d.kind === 'override') out.push(overrideAsConst(d.text, d.name, constants[d.name]));
      else out.push(d.text);
    }
  }
  return `${out.join('\n')}\n`;
}

function overrideAsConst(text: string, name: string, value: number | boolean | undefined): string {
  const m = /override\s+([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*([A-Za-z0-9_]+))?\s*(?:=\s*([^;]+))?;/.exec(
    text.replace(/^(\s*@\w+\s*(\([^)]*\))?\s*)*/, ''),
  );
  if (!m) throw new Error(`cannot read the override declaration of ${name}: ${text}`);
  const type = m[2];
  // Without its type a given value's literal would be guessed (2 for an f32 becomes an i32).
  if (value !== undefined && type === undefined) throw new Error(`override ${name} needs a type to take a value`);
  const init = value === undefined ? m[3]?.trim() : wgslLiteral(value, type);
  if (init === undefined) throw new Error(`override ${name} has no value and no default`);
  return `const ${name}${type ? `: ${type}` : ''} = ${init};`;
}
