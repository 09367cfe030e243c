// Lets plain Node import files as text with Vite's `?raw` suffix (the WGSL shaders), so the CLI
// and scripts run the same sources as Vite and vitest: node --import tsx --import ./tools/raw-import.mjs
import { register } from 'node:module';

register('./raw-import-hooks.mjs', import.meta.url);
