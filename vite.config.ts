import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';
import { VitePWA } from 'vite-plugin-pwa';

// The studio (apps/studio) is the app `npm start` serves. It imports the packages' TypeScript
// sources from the workspace, so the dev server may read the whole repository.
const root = fileURLToPath(new URL('.', import.meta.url));

export default defineConfig({
  root: 'apps/studio',
  publicDir: 'public',
  server: { fs: { allow: [root] } },
  build: {
    outDir: '../../dist/studio',
    emptyOutDir: true,
    target: 'es2022',
    // Typed errors are told apart by their class names, in the page and in the worker.
    rolldownOptions: { output: { keepNames: true } },
  },
  worker: { format: 'es', rolldownOptions: { output: { keepNames: true } } },
  plugins: [
    // Offline after the first visit: Workbox precaches the built app (worker included), the
    // bundled model and the example data; models downloaded later are cached by the trainer.
    VitePWA({
      // A new version waits for every studio tab to close: reloading a page by itself would
      // interrupt a training run.
      registerType: 'prompt',
      injectRegister: false,
      includeAssets: ['icon.svg', 'icon-192.png', 'icon-512.png'],
      workbox: {
        globPatterns: ['**/*.{js,css,html,svg,png,json,jsonl,safetensors,txt,md}'],
        maximumFileSizeToCacheInBytes: 16 * 2 ** 20,
        navigateFallbackDenylist: [/^\/models\//, /^\/data\//],
      },
      manifest: {
        name: 'webtune studio',
        short_name: 'webtune',
        description: 'Fine-tune a language model on your own data, on your own GPU, in the browser.',
        theme_color: '#1e3a8a',
        background_color: '#f8fafc',
        display: 'standalone',
        start_url: '/',
        icons: [
          { src: 'icon-192.png', sizes: '192x192', type: 'image/png' },
          { src: 'icon-512.png', sizes: '512x512', type: 'image/png' },
          { src: 'icon.svg', sizes: 'any', type: 'image/svg+xml' },
        ],
      },
    }),
  ],
});
