/**
 * Where a model's files come from: a folder on disk (Node), a base URL (fetch: the Hub or the
 * studio's own server), or files a person dropped into the page. Everything that reads model
 * files (config, tokenizer, safetensors) goes through this interface, so each works everywhere.
 */
export interface ModelSource {
  /** Names the source in error messages: a path, a URL, "dropped files". */
  readonly description: string;
  /** A whole (small) file as text, or undefined when the file does not exist. */
  readText(name: string): Promise<string | undefined>;
  /** A file's size in bytes, or undefined when it does not exist. */
  size(name: string): Promise<number | undefined>;
  /** Bytes [start, end) of a file. Rejects when the file is missing or shorter than `end`. */
  readRange(name: string, start: number, end: number): Promise<Uint8Array>;
}
