/**
 * Typed errors. Every failure a user can meet has its own class with the facts needed to act on
 * it (which limit, which shader line, which operand), so callers can branch on `instanceof`
 * and the message alone tells a person what to do.
 */
export class WebtuneError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** No `navigator.gpu`, no adapter, or the device could not be created. */
export class WebGpuUnavailableError extends WebtuneError {}

/** The device was lost (driver reset, tab backgrounded too long, `destroy()`). */
export class DeviceLostError extends WebtuneError {
  constructor(
    readonly reason: string,
    readonly deviceMessage: string,
  ) {
    super(`WebGPU device lost (${reason}): ${deviceMessage || 'no message from the driver'}`);
  }
}

export interface ShaderMessage {
  readonly type: string;
  readonly line: number;
  readonly column: number;
  readonly message: string;
}

/** WGSL failed to compile or a pipeline could not be built from it. */
export class ShaderCompileError extends WebtuneError {
  constructor(
    readonly shader: string,
    readonly messages: readonly ShaderMessage[],
    sourceLines: readonly string[] = [],
  ) {
    const detail = messages
      .map((m) => {
        const src = sourceLines[m.line - 1];
        return `  ${shader}:${m.line}:${m.column} ${m.type}: ${m.message}${src === undefined ? '' : `\n    ${src.trim()}`}`;
      })
      .join('\n');
    super(`shader ${shader} failed to compile:\n${detail}`);
  }
}

/** An allocation failed inside an out-of-memory error scope. */
export class OutOfMemoryError extends WebtuneError {
  constructor(
    readonly what: string,
    readonly bytes: number,
    deviceMessage = '',
  ) {
    super(`out of GPU memory allocating ${what} (${formatBytes(bytes)})${deviceMessage ? `: ${deviceMessage}` : ''}`);
  }
}

/** A size asked for is larger than the device allows. Raised before the GPU sees the request. */
export class LimitExceededError extends WebtuneError {
  constructor(
    readonly limit: string,
    readonly requested: number,
    readonly allowed: number,
    readonly what: string,
  ) {
    super(
      `${what} needs ${limit} = ${requested}${limit.endsWith('Size') ? ` (${formatBytes(requested)})` : ''}, ` +
        `but this device allows ${allowed}${limit.endsWith('Size') ? ` (${formatBytes(allowed)})` : ''}`,
    );
  }
}

/** Operands whose shapes do not fit together, or a dimension that is not a positive integer. */
export class ShapeError extends WebtuneError {}

/** A validation error from WebGPU that escaped our own checks: always a bug in webtune. */
export class GpuValidationError extends WebtuneError {}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${bytes} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}
