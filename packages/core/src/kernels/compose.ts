/** One WGSL file, imported as text, and the path error messages name it by. */
export interface ShaderPart {
  readonly file: string;
  readonly source: string;
}

/** The WGSL extensions a composed module may enable. */
export type ShaderExtension = 'f16' | 'subgroups';

/**
 * One WGSL module from several files: the `enable` directives first (WGSL wants every directive
 * before the first declaration, so the parts themselves carry none), then the parts in order.
 * With subgroups the uniformity analysis's subgroup rule is turned off: the reductions call
 * subgroup operations under branches on the subgroup size, which is the same for a whole subgroup
 * but which the analysis cannot tell from a per-invocation value.
 */
export function composeShader(extensions: readonly ShaderExtension[], parts: readonly ShaderPart[]): ShaderPart {
  const directives = extensions.map((e) => `enable ${e};`);
  if (extensions.includes('subgroups')) directives.push('diagnostic(off, subgroup_uniformity);');
  return {
    source: [...directives, ...parts.map((p) => p.source)].join('\n'),
    file: parts.map((p) => p.file).join(' + '),
  };
}
