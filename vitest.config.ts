import { existsSync } from 'node:fs';
import { playwright } from '@vitest/browser-playwright';
import { defineConfig } from 'vitest/config';
import { chromiumFeatureLevel, chromiumPath, chromiumWebGpuArgs, lavapipe25Icd } from './tools/chromium.js';

// Tests whose name ends in .cpu.test.ts need no GPU (references, parsers) and .node.test.ts need
// Node itself (the CLI in a child process); both run under Node only.
// Every other test runs three times: Node + Dawn (SwiftShader when there is no GPU), and headless
// Chromium on its SwiftShader adapter and on lavapipe through the compatibility adapter (the model
// tests skip Chromium's SwiftShader, the large kernel tables run a share in Chromium (caseShare,
// below); node-gpu-kernels and node-lavapipe-f16 add runs).
const gpuTests = ['packages/*/test/**/*.test.ts'];
const cpuTests = ['packages/*/test/**/*.cpu.test.ts', 'packages/*/test/**/*.node.test.ts'];
// End-to-end specs drive the studio in Debian's Chromium from Node (Playwright).
const e2eTests = ['e2e/**/*.node.test.ts'];

// Whole-model golden tests (hundreds of dispatches each, dozens of pipelines) run under Node and
// in Chromium on lavapipe; Chromium's SwiftShader compiles pipelines ten times slower, so repeating
// them there would only add minutes to CI (the e2e specs train in Chromium on that adapter).
const modelTests = [
  'packages/models/test/forward.test.ts',
  'packages/models/test/generate.test.ts',
  'packages/models/test/evaluate.test.ts',
  'packages/models/test/backward.test.ts',
  'packages/models/test/quantized.test.ts',
  'packages/models/test/split_table.test.ts',
  'packages/models/test/gguf.test.ts',
  'packages/models/test/lora_dropout.test.ts',
  'packages/models/test/f16_tiles.test.ts',
  'packages/models/test/train_f16.test.ts',
  'packages/train/test/trainer.test.ts',
  'packages/train/test/trainer_f16.test.ts',
  'packages/train/test/api.test.ts',
  // estimateMemory against a trainer's live bytes, and merged models' logits: whole models too.
  'packages/train/test/memory.test.ts',
  'packages/train/test/merge.test.ts',
];

// The Node tests that plan whole models through useGpu: they run without isolation (isolate: false;
// one process on these 2-core machines, where vitest runs one worker), and useGpu hands the files of
// a worker one context per set of options (shareContexts, gpu.ts), so the kernels one file compiled
// serve the next. Compiling is most of their time on SwiftShader, and these files
// compile largely the same pipelines: seven of them compiled 325 pipelines, 155 of them distinct.
// None mocks, stubs globals or sets the environment.
const sharedContextTests = [
  'packages/models/test/backward.test.ts',
  'packages/models/test/evaluate.test.ts',
  'packages/models/test/f16_tiles.test.ts',
  'packages/models/test/forward.test.ts',
  'packages/models/test/generate.test.ts',
  'packages/models/test/gguf.test.ts',
  'packages/models/test/lora_dropout.test.ts',
  'packages/models/test/quantized.test.ts',
  'packages/models/test/split_table.test.ts',
  'packages/models/test/train_f16.test.ts',
  'packages/models/test/weights.test.ts',
  'packages/train/test/fused.node.test.ts',
  'packages/train/test/memory.test.ts',
  'packages/train/test/merge.node.test.ts',
  'packages/train/test/merge.test.ts',
  'packages/train/test/trainer.test.ts',
  'packages/train/test/trainer_f16.test.ts',
];

// Mesa 25's lavapipe, unpacked by tools/setup.mjs (tools/lavapipe25.sh): under Node the only adapter
// here with shader-f16, and subgroups of 8 where SwiftShader's are 4.
// The files whose kernels have f16 or subgroup builds (matmul_f16 holds the matmul's f16 and split-K
// cases: llvmpipe takes seconds per pipeline, and matmul.test.ts has a hundred), and the model
// tests of the inference plans and the training step that use f16 tiles. cross_entropy.test.ts is left to SwiftShader's
// subgroup build (node-gpu-kernels): cold, its pipelines take 3 to 7 minutes here.
const lavapipe25Tests = [
  'packages/core/test/context.test.ts',
  'packages/core/test/matmul_f16.test.ts',
  'packages/core/test/attention_f16.test.ts',
  'packages/core/test/rmsnorm.test.ts',
  'packages/core/test/layernorm.test.ts',
  'packages/core/test/reduce.test.ts',
  'packages/core/test/group_reduce.test.ts',
  'packages/models/test/f16_tiles.test.ts',
  'packages/models/test/train_f16.test.ts',
  'packages/train/test/trainer_f16.test.ts',
];

function chromium(name: string, adapter: 'swiftshader' | 'lavapipe') {
  return {
    test: {
      name,
      include: gpuTests,
      exclude: adapter === 'swiftshader' ? [...cpuTests, ...modelTests] : cpuTests,
      testTimeout: 120_000,
      hookTimeout: 60_000,
      // lavapipe in compatibility mode names nothing, so a context would time a probe kernel to
      // choose its kernels (profile.ts); behind other files' GPU work in Chromium's one GPU process
      // that can take a minute. Tests give it the profile it measures ('cpu'); context.test.ts runs
      // the measurement itself. The same for how its matmuls read their operands ('direct', the
      // staging probe's answer there): the probe compiles and runs the matmul kernel both ways, and
      // in every file's context it cost CI minutes and once a minute-long hook.
      provide: {
        featureLevel: chromiumFeatureLevel(adapter),
        kernelProfile: adapter === 'lavapipe' ? ('cpu' as const) : ('auto' as const),
        matmulStaging: adapter === 'lavapipe' ? ('direct' as const) : ('auto' as const),
        // matmul.test.ts runs its entries in the reading this adapter gets (Node runs both).
        matmulStagings: adapter === 'lavapipe' ? (['direct'] as const) : (['workgroup'] as const),
        // The large kernel files' tables of cases (gpu.ts's tableCases), which Node runs, each case
        // at least once. On lavapipe (compatibility mode: WGSL through GLSL, other limits) a third of
        // each; Chromium's
        // SwiftShader is Node's driver again, compiling ten times slower, so none there: its files'
        // other tests and the studio's end-to-end specs (e2e/, on this adapter) check the browser.
        caseShare: { of: 3, at: adapter === 'lavapipe' ? [1] : [] },
      },
      browser: {
        enabled: true,
        headless: true,
        screenshotFailures: false,
        provider: playwright({ launchOptions: { executablePath: chromiumPath(), args: chromiumWebGpuArgs(adapter) } }),
        instances: [{ browser: 'chromium' as const }],
      },
    },
  };
}

// Node + Dawn on SwiftShader (the CPU kernel configurations), every GPU test but the whole-model
// ones, which node-models runs with the same configuration.
const nodeProject = {
  test: {
    name: 'node',
    // and the benchmark's own statistics (bench/*.cpu.test.ts), which need no GPU.
    include: [...gpuTests, 'bench/**/*.cpu.test.ts'],
    exclude: sharedContextTests,
    environment: 'node',
    pool: 'forks' as const,
    testTimeout: 120_000,
    hookTimeout: 60_000,
    provide: {
      featureLevel: 'core' as const,
      // The kernel tables that both kernel configurations run (the tiled matmul's staged
      // reading, LoRA, attention, loss: gpu.ts's tableCases): a third here on the CPU ones,
      // the other two thirds on the GPU ones (node-gpu-kernels), the same WGSL with other
      // tiles; the awkward sizes cross tile edges in both, and every model test (node-models)
      // plans the CPU ones. The matmul's direct reading, the CPU ones' alone, runs whole.
      profileSplit: { of: 3, at: [2] },
    },
    env: { XDG_RUNTIME_DIR: '/tmp' },
  },
};

export default defineConfig({
  test: {
    projects: [
      nodeProject,
      {
        // node's whole-model tests, without isolation and sharing contexts (sharedContextTests,
        // above); node's configuration otherwise.
        test: {
          ...nodeProject.test,
          name: 'node-models',
          include: sharedContextTests,
          exclude: [],
          isolate: false,
          provide: { ...nodeProject.test.provide, shareContexts: true },
        },
      },
      {
        // The GPU kernel configurations (wide workgroups, tiles staged in workgroup memory, tree
        // reductions) checked on the software adapter: the kernel tests again under Node with the
        // kernel profile forced to 'gpu', as a real GPU in any feature level gets it.
        test: {
          name: 'node-gpu-kernels',
          include: ['packages/core/test/**/*.test.ts'],
          exclude: cpuTests,
          environment: 'node',
          pool: 'forks',
          testTimeout: 120_000,
          hookTimeout: 60_000,
          // The GPU configurations always stage their tiles (direct reads are a CPU profile's).
          provide: {
            featureLevel: 'core' as const,
            kernelProfile: 'gpu' as const,
            matmulStagings: ['workgroup'] as const,
            // The two thirds of the split tables that the CPU configurations leave (node, above).
            profileSplit: { of: 3, at: [0, 1] },
          },
          env: { XDG_RUNTIME_DIR: '/tmp' },
        },
      },
      ...(existsSync(lavapipe25Icd)
        ? [
            {
              // The kernel tests once more on Mesa 25 lavapipe with the GPU configurations: the f16
              // builds (shader-f16) and the subgroup reductions at another subgroup size.
              test: {
                name: 'node-lavapipe-f16',
                include: lavapipe25Tests,
                environment: 'node',
                pool: 'forks',
                // llvmpipe compiles an f16 kernel in up to minutes with a cold shader cache (CI's),
                // more behind other files' work, and a trainer test compiles dozens: a hang guard,
                // not a time the tests must meet.
                testTimeout: 600_000,
                hookTimeout: 120_000,
                provide: {
                  featureLevel: 'core' as const,
                  kernelProfile: 'gpu' as const,
                  requireFeatures: ['shaderF16', 'subgroups'] as const,
                  featureBuildsOnly: true,
                },
                env: { XDG_RUNTIME_DIR: '/tmp', VK_ICD_FILENAMES: lavapipe25Icd },
              },
            },
          ]
        : []),
      chromium('chromium-swiftshader', 'swiftshader'),
      chromium('chromium-lavapipe', 'lavapipe'),
      {
        // The end-to-end specs run after the rest (`npm test` starts them on their own), one file
        // at a time: they time the studio's main thread, which other tests would slow down.
        test: {
          name: 'e2e',
          include: e2eTests,
          environment: 'node',
          pool: 'forks',
          fileParallelism: false,
          testTimeout: 600_000,
          hookTimeout: 600_000,
          env: { XDG_RUNTIME_DIR: '/tmp' },
        },
      },
    ],
  },
});
