/**
 * What loadModel() accepts -> a ModelSource the model loader reads, with the id adapters record
 * as base_model_name_or_path.
 */

import { WebtuneError } from '@webtune/core';
import { directorySource, filesSource, type ModelSource, type NamedBlob, urlSource } from '@webtune/models';
import type { LoadModelOptions, ModelInput } from './types.js';

export interface OpenedModel {
  readonly source: ModelSource;
  readonly id: string;
}

const HUB_ID = /^[\w.-]+\/[\w.-]+$/;

function isNode(): boolean {
  return typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node === 'string';
}

function isDirectoryHandle(input: unknown): input is FileSystemDirectoryHandle {
  return typeof input === 'object' && input !== null && (input as { kind?: unknown }).kind === 'directory';
}

export async function openModelInput(
  input: ModelInput,
  options: Pick<LoadModelOptions, 'revision' | 'endpoint' | 'cache'> & {
    onDownload?: (p: { file: string; loaded: number; total: number }) => void;
    signal?: AbortSignal;
  },
): Promise<OpenedModel> {
  if (typeof input === 'string' || input instanceof URL) {
    const text = String(input);
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text) || text.startsWith('/') || text.startsWith('.')) {
      if (isNode() && !/^https?:/i.test(text)) return { source: directorySource(text), id: text };
      const base = new URL(text, (globalThis as { location?: { href: string } }).location?.href);
      return { source: urlSource(base.href), id: text };
    }
    if (isNode()) {
      const fs = await import(/* @vite-ignore */ 'node:fs');
      if (fs.existsSync(text)) return { source: directorySource(text), id: text };
    }
    if (HUB_ID.test(text))
      return openModelInput({ hub: text, ...(options.revision ? { revision: options.revision } : {}) }, options);
    throw new WebtuneError(
      `loadModel: ${JSON.stringify(text)} is neither a Hugging Face repo id ("owner/name"), a URL, nor a folder`,
    );
  }
  if (isDirectoryHandle(input)) {
    throw new WebtuneError('loadModel: folder handles are not supported yet; pick the folder’s files instead');
  }
  if (Array.isArray(input) || (typeof FileList !== 'undefined' && input instanceof FileList)) {
    const files = Array.from(input as ArrayLike<File>) as NamedBlob[];
    return {
      source: filesSource(files),
      id: (files[0] as File | undefined)?.webkitRelativePath?.split('/')[0] || 'local model',
    };
  }
  if ('hub' in input) {
    const endpoint = (options.endpoint ?? 'https://huggingface.co').replace(/\/+$/, '');
    const revision = encodeURIComponent(input.revision ?? options.revision ?? 'main');
    return { source: urlSource(`${endpoint}/${input.hub}/resolve/${revision}/`), id: input.hub };
  }
  if ('url' in input) return openModelInput(input.url, options);
  if ('directory' in input) return { source: directorySource(input.directory), id: input.directory };
  throw new WebtuneError('loadModel: unrecognised model input');
}

/** SHA-256 over config.json and the safetensors headers (interim: values are not sampled). */
export async function fingerprintModel(source: ModelSource): Promise<string> {
  const parts: Uint8Array[] = [];
  const enc = new TextEncoder();
  parts.push(enc.encode((await source.readText('config.json')) ?? ''));
  const index = await source.readText('model.safetensors.index.json');
  const files = index
    ? [...new Set(Object.values((JSON.parse(index) as { weight_map: Record<string, string> }).weight_map))]
    : ['model.safetensors'];
  for (const file of files) {
    const size = await source.size(file);
    if (size === undefined) continue;
    const head = await source.readRange(file, 0, Math.min(size, 8));
    const n = Number(new DataView(head.buffer, head.byteOffset, 8).getBigUint64(0, true));
    parts.push(await source.readRange(file, 0, Math.min(size, 8 + n)));
  }
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    all.set(p, o);
    o += p.length;
  }
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', all));
  return [...digest.slice(0, 16)].map((b) => b.toString(16).padStart(2, '0')).join('');
}
