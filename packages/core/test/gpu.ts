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
    /** The share of each kernel file's table of cases the project runs (`tableCases`): one case in
     * `of`, from the `at`-th on. Absent: all of them. */
    caseShare?: { of: number; at: number };
  }
}

/**
 * The `it` of a kernel test file's table of cases (shapes, dtypes, options). The project runs every
 * case, or where vitest.config.ts gives it a `caseShare` (the Chromium projects) one case in
 * `of`: Node runs the whole table on the same kernels, and every case is a pipeline to compile,
 * which is what costs CI its time. The two Chromium adapters take different shares, so between
 * them the browser still meets most of the table. The others are reported skipped, not dropped.
 * Call it once per file, at the top: it counts the cases in the order they are declared.
 */
export function tableCases(): (name: string, fn: TestFunction) => void {
  const share = inject('caseShare');
  let index = 0;
  return (name, fn) => {
    const runs = share === undefined || index % share.of === share.at;
    index += 1;
    if (runs) it(name, fn);
    else it.skip(name, fn);
  };
}

/**
 * One context per test file (per call), destroyed after it. Fails the file on any uncaptured GPU
 * error. `overrides` adds context options to the project's (vitest.config.ts).
 */
export function useGpu(overrides: Partial<GpuContextOptions> = {}): () => GpuContext {
  let ctx: GpuContext | undefined;
  const reports: string[] = [];
  beforeAll(async () => {
    ctx = await createGpuContext({
      featureLevel: inject('featureLevel') ?? 'core',
      kernelProfile: inject('kernelProfile') ?? 'auto',
      matmulStaging: inject('matmulStaging') ?? 'auto',
      label: 'test',
      ...overrides,
    });
    (ctx as GpuContext & { reports?: string[] }).reports = reports;
    for (const f of inject('requireFeatures') ?? []) {
      if (f === 'subgroups' && overrides.allowSubgroups === false) continue;
      if (!ctx.features[f]) throw new Error(`this test project needs ${f}, and ${describeAdapter(ctx)} has none`);
    }
  });
  afterAll(() => {
    if (reports.length > 0 && ctx) console.log(`${describeAdapter(ctx)}\n${reports.join('\n')}`);
    const errors = ctx?.takeUncapturedErrors() ?? [];
    ctx?.destroy();
    expect(errors.map((e) => e.message)).toEqual([]);
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
