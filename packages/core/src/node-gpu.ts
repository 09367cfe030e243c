/**
 * WebGPU under Node through the `webgpu` package (Dawn). Loaded only when there is no
 * `navigator.gpu`, by a dynamic import that bundlers leave alone, so browser builds never see it.
 */

/** Software Vulkan drivers to fall back to when Dawn finds no usable GPU. Chromium ships
 * SwiftShader; Debian's lavapipe 22 is rejected by Dawn, so it is not listed. */
const FALLBACK_ICDS = ['/usr/lib/chromium/vk_swiftshader_icd.json'];

interface DawnModule {
  create(flags: string[]): GPU;
  globals: Record<string, unknown>;
}

export interface NodeGpu {
  /** The object `create()` returned. Dawn crashes the process if it is garbage-collected while
   * a device made from it is alive, so the context keeps this reference for its lifetime. */
  readonly gpu: GPU;
  readonly adapter: GPUAdapter | null;
  /** Set when no hardware adapter was found and a software driver was selected instead. */
  readonly softwareFallback?: string;
}

export function isNode(): boolean {
  const p = (globalThis as { process?: { versions?: { node?: string } } }).process;
  return typeof p?.versions?.node === 'string';
}

export async function requestNodeAdapter(options: GPURequestAdapterOptions): Promise<NodeGpu> {
  const name = 'webgpu';
  let mod: DawnModule;
  try {
    mod = (await import(/* @vite-ignore */ name)) as DawnModule;
  } catch (cause) {
    throw new Error(`the 'webgpu' package (Dawn for Node) could not be loaded: ${String(cause)}`);
  }
  // Dawn's globals carry GPUBufferUsage, GPUMapMode and friends, which the browser defines.
  for (const [key, value] of Object.entries(mod.globals)) {
    if (!(key in globalThis)) (globalThis as Record<string, unknown>)[key] = value;
  }
  const gpu = mod.create([]);
  const adapter = await gpu.requestAdapter(options);
  if (adapter) return { gpu, adapter };

  const env = (globalThis as unknown as { process: { env: Record<string, string | undefined> } }).process.env;
  if (env.VK_ICD_FILENAMES || env.VK_DRIVER_FILES) return { gpu, adapter: null };
  const { existsSync } = await import(/* @vite-ignore */ 'node:fs');
  for (const icd of FALLBACK_ICDS) {
    if (!existsSync(icd)) continue;
    // The Vulkan loader reads this at instance creation, so a fresh Dawn instance sees it.
    env.VK_ICD_FILENAMES = icd;
    const soft = mod.create([]);
    const softAdapter = await soft.requestAdapter(options);
    if (softAdapter) return { gpu: soft, adapter: softAdapter, softwareFallback: icd };
    delete env.VK_ICD_FILENAMES;
  }
  return { gpu, adapter: null };
}
