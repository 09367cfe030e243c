/**
 * A zip written from chunks (fflate's streaming Zip, synchronous): each entry's content arrives as
 * an iterable of byte chunks and is compressed as it comes, so a large dataset is never held as
 * one uncompressed buffer. Entries get a fixed modification time, so the same input gives the same
 * bytes.
 */
import { Zip, ZipDeflate, ZipPassThrough } from 'fflate';

export interface ZipEntry {
  /** Path inside the archive, '/'-separated. */
  readonly path: string;
  readonly chunks: Iterable<Uint8Array>;
  /** Deflate (default) or store: already dense data (float tensors) gains little from deflate. */
  readonly store?: boolean;
}

export function zipEntries(entries: Iterable<ZipEntry>, mtime: Date): Uint8Array {
  const parts: Uint8Array[] = [];
  let failure: Error | null = null;
  let finished = false;
  const zip = new Zip((error, chunk, final) => {
    if (error) failure = error;
    else parts.push(chunk);
    if (final) finished = true;
  });
  for (const entry of entries) {
    const file = entry.store ? new ZipPassThrough(entry.path) : new ZipDeflate(entry.path, { level: 6 });
    file.mtime = mtime;
    zip.add(file);
    let previous: Uint8Array | undefined;
    // One chunk behind, so that the last one can carry final = true.
    for (const chunk of entry.chunks) {
      if (previous !== undefined) file.push(previous);
      previous = chunk;
    }
    file.push(previous ?? new Uint8Array(0), true);
    if (failure) throw failure;
  }
  zip.end();
  if (failure) throw failure;
  if (!finished) throw new Error('zip: the archive did not finish (an entry was left open)');
  let size = 0;
  for (const p of parts) size += p.byteLength;
  const out = new Uint8Array(size);
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.byteLength;
  }
  return out;
}
