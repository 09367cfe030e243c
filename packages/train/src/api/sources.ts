/**
 * What loadModel() accepts -> a ModelSource the model loader reads, with the id adapters record
 * as base_model_name_or_path. Downloads (the Hub, URLs) go through the models package's cache, so
 * a model loaded once loads again offline.
 */
import { WebtuneError } from '@webtune/core';
import {
  cachedUrlSource,
  type DownloadProgress,
  directoryHandleSource,
  directorySource,
  filesSource,
  hubModelSource,
  type ModelSource,
  type NamedBlob,
} from '@webtune/models';
import type { LoadModelOptions, ModelInput } from './types.js';

export interface OpenedModel {
  readonly source: ModelSource;
  readonly id: string;
  /** A GGUF file of the source to load (llama.cpp's format) instead of config.json + safetensors. */
  readonly gguf?: string;
}

/** A path or URL to a .gguf file: its folder and its name. */
function splitGguf(text: string): { folder: string; file: string } | undefined {
  const m = /^(.*?)([^/\\]+\.gguf)$/i.exec(text);
  if (!m) return undefined;
  return { folder: m[1] === '' ? '.' : (m[1] as string).replace(/[/\\]$/, '') || '/', file: m[2] as string };
}

const HUB_ID = /^[\w.-]+\/[\w.-]+$/;

function isNode(): boolean {
  return typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node === 'string';
}

function isDirectoryHandle(input: unknown): input is FileSystemDirectoryHandle {
  return typeof input === 'object' && input !== null && (input as { kind?: unknown }).kind === 'directory';
}

type OpenOptions = Pick<LoadModelOptions, 'revision' | 'endpoint' | 'cache'> & {
  onDownload?: (p: DownloadProgress) => void;
  signal?: AbortSignal;
};

function download(options: OpenOptions) {
  return {
    ...(options.revision ? { revision: options.revision } : {}),
    ...(options.endpoint ? { endpoint: options.endpoint } : {}),
    ...(options.cache === false ? { cache: false } : {}),
    ...(options.signal ? { signal: options.signal } : {}),
    ...(options.onDownload ? { onProgress: options.onDownload } : {}),
  };
}

async function exists(path: string): Promise<boolean> {
  const fs = (await import(/* @vite-ignore */ 'node:fs')) as typeof import('node:fs');
  return fs.existsSync(path);
}

export async function openModelInput(input: ModelInput, options: OpenOptions): Promise<OpenedModel> {
  if (typeof input === 'string' || input instanceof URL) {
    const text = String(input);
    const isUrl = /^https?:\/\//i.test(text);
    const gguf = splitGguf(text);
    if (isNode() && !isUrl && (text.startsWith('/') || text.startsWith('.') || (await exists(text)))) {
      if (gguf) return { source: directorySource(gguf.folder), id: text, gguf: gguf.file };
      return { source: directorySource(text), id: text };
    }
    if (isUrl || text.startsWith('/') || text.startsWith('.')) {
      const base = new URL(
        gguf ? `${gguf.folder}/` : text,
        (globalThis as { location?: { href: string } }).location?.href,
      );
      const opened = await cachedUrlSource(base.href, download(options));
      return { source: opened.source, id: text, ...(gguf ? { gguf: gguf.file } : {}) };
    }
    if (HUB_ID.test(text)) return openModelInput({ hub: text }, options);
    throw new WebtuneError(
      `loadModel: ${JSON.stringify(text)} is neither a Hugging Face repo id ("owner/name"), a URL, nor a folder`,
    );
  }
  if (isDirectoryHandle(input)) return { source: directoryHandleSource(input), id: input.name };
  if (Array.isArray(input) || (typeof FileList !== 'undefined' && input instanceof FileList)) {
    const files = Array.from(input as ArrayLike<File>) as NamedBlob[];
    const folder = (files[0] as File | undefined)?.webkitRelativePath?.split('/')[0];
    // A dropped .gguf file (with its tokenizer.json, or alone) is a GGUF base.
    const gguf = files.find((f) => /\.gguf$/i.test(f.name))?.name;
    return { source: filesSource(files), id: folder || gguf || 'local model', ...(gguf ? { gguf } : {}) };
  }
  if ('hub' in input) {
    const opened = await hubModelSource(input.hub, {
      ...download(options),
      ...(input.revision ? { revision: input.revision } : {}),
    });
    return { source: opened.source, id: input.hub };
  }
  if ('url' in input) return openModelInput(input.url, options);
  if ('directory' in input) return { source: directorySource(input.directory), id: input.directory };
  throw new WebtuneError('loadModel: unrecognised model input');
}
