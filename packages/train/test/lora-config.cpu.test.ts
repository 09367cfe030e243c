// LoraConfig validation (PEFT's defaults and checks, webtune's refusals) and the Python pieces the PEFT
// format depends on: json.dumps of floats / strings / nested objects (golden python-json.json from
// tools/golden_peft_config.py), repr(), and Python regexes run by RegExp.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { LORA_CONFIG_DEFAULTS, type LoraConfigInput, loraScale, validateLoraConfig } from '../src/lora/config.js';
import { LoraConfigError } from '../src/lora/errors.js';
import {
  PyFloat,
  type PyJson,
  pyFloatRepr,
  pyJsonDumps,
  pyJsonString,
  pyRepr,
  pySetRepr,
  pythonRegex,
} from '../src/lora/python.js';

const GOLDEN = fileURLToPath(new URL('./golden/peft-config/', import.meta.url));

interface PythonJsonGolden {
  floats: { value: number; hex: string; dumps: string }[];
  strings: { value: string; dumps: string }[];
  nested: { value: Record<string, PyJson>; dumps: string };
}
const pyGolden: PythonJsonGolden = JSON.parse(readFileSync(`${GOLDEN}python-json.json`, 'utf8'));

function expectConfigError(input: unknown, field: string, reason: RegExp): void {
  let caught: unknown;
  try {
    validateLoraConfig(input);
  } catch (error) {
    caught = error;
  }
  expect(caught).toBeInstanceOf(LoraConfigError);
  expect((caught as LoraConfigError).field).toBe(field);
  expect((caught as LoraConfigError).reason).toMatch(reason);
  expect((caught as LoraConfigError).message).toContain(`LoraConfig.${field}: `);
}

/** Python's float.hex() -> the double (exact: a <= 53-bit integer times a power of two). */
function fromHex(hex: string): number {
  const m = /^(-?)0x([01])\.([0-9a-f]+)p([+-]\d+)$/.exec(hex);
  if (!m) throw new Error(`unexpected hex ${hex}`);
  const [, sign, lead, frac, exp] = m as unknown as [string, string, string, string, string];
  const value = Number(BigInt(`0x${lead}${frac}`)) * 2 ** (Number(exp) - 4 * frac.length);
  return sign === '-' ? -value : value;
}

describe('validateLoraConfig', () => {
  it("fills PEFT's defaults (task_type CAUSAL_LM is webtune's)", () => {
    expect(validateLoraConfig()).toEqual(LORA_CONFIG_DEFAULTS);
    expect(validateLoraConfig({})).toEqual({
      r: 8,
      lora_alpha: 8,
      lora_dropout: 0,
      target_modules: null,
      use_rslora: false,
      init_lora_weights: true,
      rank_pattern: {},
      alpha_pattern: {},
      layers_to_transform: null,
      layers_pattern: null,
      bias: 'none',
      fan_in_fan_out: false,
      modules_to_save: null,
      use_dora: false,
      task_type: 'CAUSAL_LM',
    });
    expect(Object.isFrozen(validateLoraConfig({ target_modules: ['q_proj'] }).target_modules)).toBe(true);
  });

  it('keeps what is given, drops duplicate target names', () => {
    const c = validateLoraConfig({
      r: 16,
      lora_alpha: 3.5,
      lora_dropout: 0.05,
      target_modules: ['q_proj', 'v_proj', 'q_proj'],
      use_rslora: true,
      init_lora_weights: 'gaussian',
      rank_pattern: { q_proj: 4 },
      alpha_pattern: { 'layers\\.0\\..*': 2.5 },
      layers_to_transform: [0, 2],
      layers_pattern: 'layers',
      task_type: null,
    });
    expect(c.target_modules).toEqual(['q_proj', 'v_proj']);
    expect(c.r).toBe(16);
    expect(c.layers_to_transform).toEqual([0, 2]);
    expect(c.init_lora_weights).toBe('gaussian');
    expect(c.task_type).toBeNull();
  });

  const bad: [string, LoraConfigInput | unknown, string, RegExp][] = [
    ['not an object', 7, '(config)', /must be an object/],
    ['unknown field', { rank: 8 }, 'rank', /not a LoraConfig field.*r, lora_alpha/],
    ['r = 0', { r: 0 }, 'r', /`r` should be a positive integer value but the value passed is 0/],
    ['fractional r', { r: 2.5 }, 'r', /positive integer/],
    ['r as text', { r: '8' }, 'r', /positive integer.*"8"/],
    ['alpha 0', { lora_alpha: 0 }, 'lora_alpha', /finite number > 0, got 0/],
    ['alpha NaN', { lora_alpha: Number.NaN }, 'lora_alpha', /finite number/],
    ['dropout 1', { lora_dropout: 1 }, 'lora_dropout', /\[0, 1\), got 1/],
    ['dropout negative', { lora_dropout: -0.1 }, 'lora_dropout', /\[0, 1\)/],
    [
      'empty target list',
      { target_modules: [] },
      'target_modules',
      /No `target_modules` passed but also no `target_parameters`/,
    ],
    ['empty target name', { target_modules: ['q_proj', ''] }, 'target_modules', /non-empty module names/],
    ['empty regex', { target_modules: '' }, 'target_modules', /empty string/],
    ['bad regex', { target_modules: '(q_proj' }, 'target_modules', /not a regular expression/],
    [
      'target number',
      { target_modules: 3 },
      'target_modules',
      /list of module names, a regex string, "all-linear" or null/,
    ],
    ['rslora text', { use_rslora: 'yes' }, 'use_rslora', /true or false/],
    [
      'pissa',
      { init_lora_weights: 'pissa_niter_4' },
      'init_lora_weights',
      /PEFT initialisation webtune does not implement/,
    ],
    ['init other', { init_lora_weights: 'uniform' }, 'init_lora_weights', /true, "gaussian" or false, got "uniform"/],
    ['rank pattern value', { rank_pattern: { q_proj: 0 } }, 'rank_pattern', /"q_proj".*positive integer rank/],
    ['rank pattern regex', { rank_pattern: { '(': 4 } }, 'rank_pattern', /not a regular expression/],
    ['rank pattern list', { rank_pattern: [4] }, 'rank_pattern', /must be an object/],
    ['alpha pattern value', { alpha_pattern: { q_proj: -1 } }, 'alpha_pattern', /finite alpha > 0/],
    ['layers negative', { layers_to_transform: [-1] }, 'layers_to_transform', /integers >= 0/],
    ['layers text', { layers_to_transform: '0' }, 'layers_to_transform', /layer index/],
    ['layers pattern number', { layers_pattern: 3, layers_to_transform: 0 }, 'layers_pattern', /string, a list/],
    [
      'regex with layers',
      { target_modules: '.*proj', layers_to_transform: [0] },
      'layers_to_transform',
      /^`layers_to_transform` cannot be used when `target_modules` is a str\.$/,
    ],
    [
      'regex with layers_pattern',
      { target_modules: '.*proj', layers_pattern: 'layers' },
      'layers_pattern',
      /^`layers_pattern` cannot be used when `target_modules` is a str\.$/,
    ],
    [
      'pattern without layers',
      { target_modules: ['q_proj'], layers_pattern: 'layers' },
      'layers_pattern',
      /When `layers_pattern` is specified, `layers_to_transform` must also be specified/,
    ],
    ['bias all', { bias: 'all' }, 'bias', /must be "none", got "all".*lora_only/],
    ['fan_in_fan_out text', { fan_in_fan_out: 'true' }, 'fan_in_fan_out', /true or false/],
    ['modules_to_save', { modules_to_save: ['lm_head'] }, 'modules_to_save', /must be null, got \["lm_head"\]/],
    ['dora', { use_dora: true }, 'use_dora', /must be false.*DoRA/],
    ['task type', { task_type: 'SEQ_CLS' }, 'task_type', /"CAUSAL_LM" or null, got "SEQ_CLS"/],
  ];
  for (const [name, input, field, reason] of bad) {
    it(`refuses ${name}`, () => expectConfigError(input, field, reason));
  }

  it('accepts an empty layers_pattern without layers_to_transform (falsy in PEFT)', () => {
    expect(validateLoraConfig({ target_modules: ['q_proj'], layers_pattern: '' }).layers_pattern).toBe('');
  });

  it('scale is alpha / r, or alpha / sqrt(r) with rsLoRA', () => {
    expect(loraScale(16, 8, false)).toBe(2);
    expect(loraScale(16, 8, true)).toBe(16 / Math.sqrt(8));
    expect(loraScale(3.5, 2, false)).toBe(1.75);
  });
});

describe('Python json.dumps', () => {
  it('floats as float.__repr__ writes them', () => {
    for (const f of pyGolden.floats) {
      const value = fromHex(f.hex);
      expect(Object.is(value, f.value) || value === f.value).toBe(true);
      expect(pyFloatRepr(value)).toBe(f.dumps);
      expect(pyJsonDumps(new PyFloat(value))).toBe(f.dumps);
    }
  });

  it('strings with ensure_ascii', () => {
    for (const s of pyGolden.strings) expect(pyJsonString(s.value)).toBe(s.dumps);
  });

  it('a nested object with indent=2 and sort_keys', () => {
    const v = pyGolden.nested.value as Record<string, PyJson>;
    // 2.0 and 1e-05 are floats in Python; JSON.parse gave plain numbers.
    const marked: Record<string, PyJson> = { ...v, z: [1, new PyFloat(2), 'x'], num: new PyFloat(1e-5) };
    expect(pyJsonDumps(marked, { indent: 2, sortKeys: true })).toBe(pyGolden.nested.dumps);
  });

  it('repr of str, int, lists and sets', () => {
    expect(pyRepr('q_proj')).toBe("'q_proj'");
    expect(pyRepr("it's")).toBe('"it\'s"');
    expect(pyRepr('mlp\\..*_proj')).toBe("'mlp\\\\..*_proj'");
    expect(pyRepr([7])).toBe('[7]');
    expect(pyRepr([0, 2])).toBe('[0, 2]');
    expect(pyRepr(['h', 'layers'])).toBe("['h', 'layers']");
    expect(pySetRepr(['v_proj', 'q_proj'])).toBe("{'q_proj', 'v_proj'}");
    expect(pySetRepr([])).toBe('set()');
  });
});

describe('Python regexes', () => {
  it('translates named groups, \\A, \\Z, leading flags and a literal ] first in a class', () => {
    expect(
      pythonRegex('model\\.layers\\.(?P<i>[0-9]+)\\.mlp', 'fullmatch').exec('model.layers.12.mlp')?.groups?.i,
    ).toBe('12');
    expect(pythonRegex('(?P<a>x)y(?P=a)', 'fullmatch').test('xyx')).toBe(true);
    expect(pythonRegex('(?P<a>x)y(?P=a)', 'fullmatch').test('xyz')).toBe(false);
    expect(pythonRegex('\\Aq_proj\\Z', 'fullmatch').test('q_proj')).toBe(true);
    expect(pythonRegex('(?i)Q_PROJ', 'fullmatch').test('q_proj')).toBe(true);
    expect(pythonRegex('[]a]+', 'fullmatch').test(']a]')).toBe(true);
    expect(pythonRegex('[^]a]+', 'fullmatch').test('bcd')).toBe(true);
    expect(() => pythonRegex('(?x) q', 'fullmatch')).toThrow(SyntaxError);
    expect(() => pythonRegex('a(?i)b', 'fullmatch')).toThrow(SyntaxError);
    // Python refuses global flags that are not at the start of the whole expression.
    expect(() => pythonRegex('(?i)q', 'match', (s) => `(.*\\.)?(${s})$`)).toThrow(SyntaxError);
  });

  it('fullmatch needs the whole name, match anchors the start only', () => {
    expect(pythonRegex('q_proj', 'fullmatch').test('a.q_proj')).toBe(false);
    expect(pythonRegex('.*q_proj', 'fullmatch').test('a.q_proj')).toBe(true);
    expect(pythonRegex('a', 'match').test('abc')).toBe(true);
    expect(pythonRegex('b', 'match').test('abc')).toBe(false);
  });
});
