/**
 * Where Chromium is and which flags give it WebGPU, shared by the tests, the benchmark and the
 * end-to-end specs. Facts from ../shared/docs/WEBGPU_ON_CPU.md, measured on these machines.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** 'lavapipe25': 'lavapipe' again over Mesa 25's driver (tools/lavapipe25.sh) instead of the
 * system's (Debian bookworm's Mesa 22); see chromiumEnv. */
export const CHROMIUM_ADAPTERS = ['swiftshader', 'lavapipe', 'lavapipe25', 'gpu'] as const;
export type ChromiumAdapter = (typeof CHROMIUM_ADAPTERS)[number];

/** The feature level a page asks for to get the adapter: lavapipe is reached only through the
 * compatibility adapter (Dawn's OpenGL ES backend over ANGLE). */
export function chromiumFeatureLevel(adapter: ChromiumAdapter): 'core' | 'compatibility' {
  return adapter === 'lavapipe' || adapter === 'lavapipe25' ? 'compatibility' : 'core';
}

/** The Vulkan driver file of Mesa 25's lavapipe, unpacked by tools/setup.mjs (tools/lavapipe25.sh). */
export const lavapipe25Icd = fileURLToPath(new URL('../.cache/lavapipe25/lvp_icd.json', import.meta.url));

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
 * the CPU; 'lavapipe' and 'lavapipe25': Mesa's CPU Vulkan through ANGLE, reached with featureLevel
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
  if (chromiumFeatureLevel(adapter) === 'compatibility')
    return [...common, '--use-angle=vulkan', '--use-webgpu-adapter=opengles'];
  if (adapter === 'gpu') return [...common, '--enable-features=Vulkan', '--use-angle=vulkan', '--ignore-gpu-blocklist'];
  return common;
}

/**
 * The environment Chromium is started with: the caller's, and for 'lavapipe25' the Vulkan loader
 * pointed at Mesa 25's lavapipe alone (VK_ICD_FILENAMES). Why a second lavapipe: Mesa 22's (Debian
 * bookworm's) specialises a compute shader on the values of the uniforms its loops and branches
 * read, whenever the pipeline is bound, and compiles that variant again at every bind without
 * keeping it (lavapipe's uniform inlining, `update_inline_shader_state`; later Mesas keep the
 * variants). Dawn's OpenGL ES backend over ANGLE binds at every dispatch, so there every dispatch of
 * a large kernel whose loops become short enough to unroll (a small model's matmuls) costs a shader
 * compile, answered from Mesa's disk cache in milliseconds. Mesa 25 is the driver that current
 * distributions ship (Debian 13). Throws when it is not unpacked.
 */
export function chromiumEnv(adapter: ChromiumAdapter): Record<string, string | undefined> {
  return adapter === 'lavapipe25' ? lavapipe25Env(adapter) : { ...process.env };
}

/** This process's environment with the Vulkan loader pointed at Mesa 25's lavapipe alone, for
 * Chromium or a Node child (`who` names the run in the error). Throws when it is not unpacked. */
export function lavapipe25Env(who: string): Record<string, string | undefined> {
  if (!existsSync(lavapipe25Icd))
    throw new Error(
      `the ${who} adapter needs Mesa 25's lavapipe in ${lavapipe25Icd}: node tools/setup.mjs unpacks it on Debian (it needs the Debian mirror, and WEBTUNE_SKIP_LAVAPIPE25 unset)`,
    );
  const env: Record<string, string | undefined> = { ...process.env, VK_ICD_FILENAMES: lavapipe25Icd };
  // The loader's other ways to find drivers: the newer name, which it would take first, and additions.
  delete env.VK_DRIVER_FILES;
  delete env.VK_ADD_DRIVER_FILES;
  return env;
}
