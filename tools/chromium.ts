/**
 * Where Chromium is and which flags give it WebGPU, shared by the tests, the benchmark and the
 * end-to-end specs. Facts from ../shared/docs/WEBGPU_ON_CPU.md, measured on these machines.
 */
import { existsSync } from 'node:fs';

export type ChromiumAdapter = 'swiftshader' | 'lavapipe' | 'gpu';

export function chromiumPath(): string {
  const candidates = [
    process.env.WEBTUNE_CHROMIUM,
    '/usr/bin/chromium',
    '/usr/bin/chromium-browser',
    '/usr/bin/google-chrome',
  ];
  for (const c of candidates) if (c && existsSync(c)) return c;
  throw new Error(
    'Chromium not found: install it (Debian: apt-get install chromium) or set WEBTUNE_CHROMIUM to its path',
  );
}

/** The flags that give headless Chromium a WebGPU adapter. 'swiftshader': its built-in Vulkan on
 * the CPU; 'lavapipe': Mesa's CPU Vulkan through ANGLE, reached with featureLevel
 * 'compatibility'; 'gpu': a real GPU through Vulkan (Linux). */
export function chromiumWebGpuArgs(adapter: ChromiumAdapter): string[] {
  const common = [
    '--enable-unsafe-webgpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    '--disable-quic',
  ];
  if (adapter === 'lavapipe') return [...common, '--use-angle=vulkan', '--use-webgpu-adapter=opengles'];
  if (adapter === 'gpu') return [...common, '--enable-features=Vulkan', '--use-angle=vulkan', '--ignore-gpu-blocklist'];
  return common;
}
