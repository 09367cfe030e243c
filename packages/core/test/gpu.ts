/**
 * Shared rig for GPU tests. The same test files run under Node (Dawn) and in headless Chromium
 * on two adapters; vitest.config.ts provides which feature level to ask for.
 */
import { afterAll, beforeAll, expect, inject, it, type TestFunction } from 'vitest';
import { compare } from '../ref/check.js';
import { createGpuContext, describeAdapter, type GpuContext, type GpuContextOptions } from '../src/index.js';

declare module 'vitest' {
  export interface ProvidedContext {
    featureLevel: 'core' | 'compatibility';
    /** 'gpu' runs the GPU kernel configurations on the software adapters (vitest.config.ts). */
    kernelProfile?: 'auto' | 'gpu' | 'cpu';
    /** How the tiled matmuls read their operands, given where the probe would be measured (lavapipe in Chromium). */
    matmulStaging?: 'auto' | 'workgroup' | 'direct';
    /** Which of the tiled matmul's operand readings matmul.test.ts runs the entries that have both
     * in (default both): each project runs the ones its adapter can be given, Node on SwiftShader
     * both. */
    matmulStagings?: readonly ('workgroup' | 'direct')[];
    /** Features the project's adapter must give (node-lavapipe-f16), so that their tests cannot all skip. */
    requireFeatures?: readonly ('shaderF16' | 'subgroups')[];
    /** The project runs only the cases of builds that need those features (node-lavapipe-f16):
     * llvmpipe takes minutes to compile some f32 kernels cold, which the other projects check. */
    featureBuildsOnly?: boolean;
    /** The share of the large kernel files' tables of cases the project runs (`tableCases`). Absent: all. */
    caseShare?: CaseShare;
    /** Under Node, the share of the tables split between the two kernel configurations (`tableCases`'s
     * `splitAcrossProfiles`) this project's configuration runs: node and node-gpu-kernels complement. */
    profileSplit?: CaseShare;
    /** useGpu hands every file of a worker the same context for the same options (`sharedContext`),
     * so a pipeline compiled by one file is not compiled again by the next (node-models, whose
     * files run without isolation: `isolate: false`). */
    shareContexts?: boolean;
  }
}

/** A share of a table of cases: the cases whose title hashes to one of `at` modulo `of`. */
export interface CaseShare {
  of: number;
  at: readonly number[];
}

/** FNV-1a of a case's title: the same case falls in the same share in every project. */
function titleHash(title: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < title.length; i++) h = Math.imul(h ^ title.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** Whether a project with this share runs the case of this title. */
export function inShare(title: string, share: CaseShare | undefined): boolean {
  return share === undefined || share.at.includes(titleHash(title) % share.of);
}

/**
 * The `it` of a kernel test file's table of cases (shapes, dtypes, options). Every case compiles a
 * pipeline of its own, and compiling is what costs CI its time on the software adapters, so the
 * projects run shares of the tables (vitest.config.ts): Chromium on lavapipe about a third
 * (`caseShare`, chosen by title, so not a third of every sub-table), Chromium on SwiftShader none.
 * Under Node, the cases for which `splitAcrossProfiles` holds are split between the two kernel
 * configurations (`profileSplit`): a third on the CPU ones (node, which every model test on
 * SwiftShader plans) and two thirds on the GPU ones (node-gpu-kernels), the same WGSL with other
 * tiles and workgroups, each case once; the other cases run in both. A case is chosen by its title,
 * so it stays in its share when the table changes around it; the others are reported skipped, not
 * dropped. The files' tests of limits and refusals, and of non-finite values, are plain `it`:
 * every project runs them.
 */
export function tableCases(
  options: { splitAcrossProfiles?: (title: string) => boolean } = {},
): (name: string, fn: TestFunction) => void {
  const share = inject('caseShare');
  const split = inject('profileSplit');
  return (name, fn) => {
    const runs = inShare(name, share) && (!options.splitAcrossProfiles?.(name) || inShare(name, split));
    if (runs) it(name, fn);
    else it.skip(name, fn);
  };
}

/** The contexts of a worker whose project shares them, by their options. With `isolate: false` the
 * files of a worker share this module's instance too; globalThis holds the pool all the same, so it
 * does not hang on how the runner loads modules. */
const SHARED_CONTEXTS = Symbol.for('webtune.test.sharedContexts');

/**
 * The worker's context for `options`, made on first use and kept for the files after (a lost one
 * is replaced). Compiling pipelines is most of what the model tests cost on the software adapters,
 * and a device keeps what it compiled: the kernel cache (kernel.ts) and Dawn's own. The files still
 * get what a context of their own gives them: no uncaptured error and no buffer left alive when
 * they end (useGpu), each case checked inside its error scopes (gpuCase).
 */
async function sharedContext(options: GpuContextOptions): Promise<GpuContext> {
  const root = globalThis as { [SHARED_CONTEXTS]?: Map<string, Promise<GpuContext>> };
  root[SHARED_CONTEXTS] ??= new Map();
  const pool = root[SHARED_CONTEXTS];
  const key = JSON.stringify(options);
  const kept = await pool.get(key)?.catch(() => undefined);
  if (kept && !kept.isLost) return kept;
  const made = createGpuContext(options);
  pool.set(key, made);
  return made;
}

/**
 * One context per test file (per call), destroyed after it, or the worker's shared one for these
 * options where the project shares them (`shareContexts`). Fails the file on any uncaptured GPU
 * error, and on a shared context on any buffer the file left alive. `overrides` adds context
 * options to the project's (vitest.config.ts).
 */
export function useGpu(overrides: Partial<GpuContextOptions> = {}): () => GpuContext {
  let ctx: GpuContext | undefined;
  let liveBefore = 0;
  const shared = inject('shareContexts') === true;
  const reports: string[] = [];
  beforeAll(async () => {
    const options: GpuContextOptions = {
      featureLevel: inject('featureLevel') ?? 'core',
      kernelProfile: inject('kernelProfile') ?? 'auto',
      matmulStaging: inject('matmulStaging') ?? 'auto',
      label: 'test',
      ...overrides,
    };
    ctx = shared ? await sharedContext(options) : await createGpuContext(options);
    liveBefore = ctx.liveBufferCount;
    (ctx as GpuContext & { reports?: string[] }).reports = reports;
    for (const f of inject('requireFeatures') ?? []) {
      if (f === 'subgroups' && overrides.allowSubgroups === false) continue;
      if (!ctx.features[f]) throw new Error(`this test project needs ${f}, and ${describeAdapter(ctx)} has none`);
    }
  });
  afterAll(() => {
    if (reports.length > 0 && ctx) console.log(`${describeAdapter(ctx)}\n${reports.join('\n')}`);
    const errors = ctx?.takeUncapturedErrors() ?? [];
    const left = shared && ctx && !ctx.isLost ? ctx.liveBufferLabels().slice(liveBefore) : [];
    if (!shared) ctx?.destroy();
    expect(errors.map((e) => e.message)).toEqual([]);
    expect(left, 'buffers the file left alive on the shared context').toEqual([]);
  });
  return () => {
    if (!ctx) throw new Error('GPU context not ready');
    return ctx;
  };
}

/** One build of the reduction kernels (shaders/group_reduce*.wgsl) that a test file checks. */
export interface ReductionPath {
  readonly name: string;
  /** The context for this path; skips `test` when the path is the same as the first one. */
  gpu(test?: { skip: (note?: string) => void }): GpuContext;
}

/**
 * The reduction kernels' two builds: the adapter's own (subgroup operations where it has them) and
 * workgroup-memory trees (subgroups turned off). On an adapter without subgroups the second is the
 * first again, so its tests skip.
 */
export function useReductionPaths(): readonly [ReductionPath, ReductionPath] {
  const adapters = useGpu();
  const trees = useGpu({ allowSubgroups: false });
  return [
    { name: 'adapter reductions', gpu: () => adapters() },
    {
      name: 'workgroup-memory trees',
      gpu: (test) => {
        if (!adapters().features.subgroups) test?.skip('no subgroups: the first path already ran the trees');
        return trees();
      },
    },
  ];
}

/**
 * Runs one GPU case inside validation and out-of-memory error scopes that must come back empty,
 * and checks that it released every buffer it made.
 */
export async function gpuCase<T>(ctx: GpuContext, name: string, fn: () => Promise<T>): Promise<T> {
  const live = ctx.liveBufferCount;
  const result = await ctx.checked(name, fn);
  expect(
    ctx.takeUncapturedErrors().map((e) => e.message),
    `${name}: uncaptured GPU errors`,
  ).toEqual([]);
  expect(ctx.liveBufferLabels().slice(live), `${name}: buffers left alive`).toEqual([]);
  return result;
}

/** Asserts |actual − expected| ≤ atol + rtol·|expected| everywhere and records the errors. */
export function expectClose(
  ctx: GpuContext,
  name: string,
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  atol: number,
  rtol: number,
): void {
  const c = compare(name, actual, expected, atol, rtol);
  (ctx as GpuContext & { reports?: string[] }).reports?.push(`  ${c.summary}`);
  expect(c.ok, c.summary).toBe(true);
}
