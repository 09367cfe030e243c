import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

// The studio (apps/studio) is the app `npm start` serves. It imports the packages' TypeScript
// sources and the WGSL shaders (as ?raw text) from the repository root, so the dev server may
// read the whole workspace.
const root = fileURLToPath(new URL('.', import.meta.url));

export default defineConfig({
  root: 'apps/studio',
  publicDir: 'public',
  server: { fs: { allow: [root] } },
  optimizeDeps: { include: ['@tensorflow/tfjs-core', '@tensorflow/tfjs-backend-webgpu'] },
  build: { outDir: '../../dist/studio', emptyOutDir: true, target: 'es2022' },
  worker: { format: 'es' },
});
