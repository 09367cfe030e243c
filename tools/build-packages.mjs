#!/usr/bin/env node
// Builds the published packages (@webtune/core, @webtune/models, @webtune/train) into dist/:
// ESM JavaScript (esbuild), `?raw` text imports (the WGSL shaders, the job script) inlined as
// strings so no bundler plugin is needed downstream, the trainer's worker as its own entry found
// by `new URL('./worker.js', import.meta.url)`, and .d.ts types (tsc). The workspace itself runs
// the TypeScript sources; only `pnpm pack` / publishing use dist (package.json publishConfig).
//
//   node tools/build-packages.mjs            build all three
//   node tools/build-packages.mjs --pack DIR build, then pnpm pack each into DIR
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const PACKAGES = [
  { name: 'core', entries: ['src/index.ts'] },
  { name: 'models', entries: ['src/index.ts'] },
  { name: 'train', entries: ['src/index.ts', 'src/api/worker.ts'] },
];

/** `import text from './x.wgsl?raw'` -> the file's text as a string constant. */
const rawText = {
  name: 'raw-text',
  setup(b) {
    b.onResolve({ filter: /\?raw$/ }, (args) => ({
      path: join(args.resolveDir, args.path.slice(0, -'?raw'.length)),
      namespace: 'raw-text',
    }));
    b.onLoad({ filter: /.*/, namespace: 'raw-text' }, (args) => ({
      contents: `export default ${JSON.stringify(readFileSync(args.path, 'utf8'))};`,
      loader: 'js',
    }));
  },
};

function run(cmd, args, cwd) {
  const r = spawnSync(cmd, args, { cwd, stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed in ${cwd}`);
}

async function buildPackage(pkg) {
  const dir = join(root, 'packages', pkg.name);
  const manifest = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
  const external = [
    ...Object.keys(manifest.dependencies ?? {}),
    ...Object.keys(manifest.peerDependencies ?? {}),
    'node:*',
  ];
  rmSync(join(dir, 'dist'), { recursive: true, force: true });
  await build({
    entryPoints: Object.fromEntries(
      pkg.entries.map((e) => [
        e
          .replace(/^src\//, '')
          .replace(/^api\//, '')
          .replace(/\.ts$/, ''),
        join(dir, e),
      ]),
    ),
    outdir: join(dir, 'dist'),
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    target: 'es2022',
    splitting: pkg.entries.length > 1,
    external,
    plugins: [rawText],
    // Error classes are told apart by name (error.name, and across the worker boundary); keep the
    // names through any minifier downstream.
    keepNames: true,
    sourcemap: true,
    logLevel: 'warning',
  });
  if (pkg.name === 'train') {
    // The sources start the worker as ./worker.ts (what Vite serves in development); the build
    // emits it as ./worker.js beside index.js.
    const file = join(dir, 'dist', 'index.js');
    const js = readFileSync(file, 'utf8');
    const pattern = /new URL\((["'])\.\/worker\.ts\1, import\.meta\.url\)/g;
    const found = js.match(pattern)?.length ?? 0;
    if (found !== 1) throw new Error(`train: expected one new URL('./worker.ts', import.meta.url), found ${found}`);
    writeFileSync(file, js.replace(pattern, 'new URL("./worker.js", import.meta.url)'));
  }
  // Types: tsc against the sibling packages' already built declarations.
  const tsconfig = join(dir, 'tsconfig.build.json');
  writeFileSync(
    tsconfig,
    JSON.stringify(
      {
        extends: '../../tsconfig.json',
        compilerOptions: {
          noEmit: false,
          declaration: true,
          emitDeclarationOnly: true,
          declarationMap: false,
          outDir: 'dist/types',
          rootDir: 'src',
          types: ['@webgpu/types', 'node'],
          paths: {
            '@webtune/core': ['../core/dist/types/index.d.ts'],
            '@webtune/models': ['../models/dist/types/index.d.ts'],
          },
        },
        include: ['src'],
      },
      null,
      2,
    ),
  );
  try {
    run(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', tsconfig], dir);
  } finally {
    rmSync(tsconfig);
  }
  // Consumers get WebGPU's types with the package's.
  const types = join(dir, 'dist', 'types', 'index.d.ts');
  writeFileSync(types, `/// <reference types="@webgpu/types" />\n${readFileSync(types, 'utf8')}`);
  console.log(`built @webtune/${pkg.name}`);
}

const args = process.argv.slice(2);
for (const pkg of PACKAGES) await buildPackage(pkg);
const pack = args.indexOf('--pack');
if (pack >= 0) {
  const out = args[pack + 1];
  if (!out) throw new Error('--pack needs a folder');
  mkdirSync(out, { recursive: true });
  for (const pkg of PACKAGES) run('pnpm', ['pack', '--pack-destination', out], join(root, 'packages', pkg.name));
}
