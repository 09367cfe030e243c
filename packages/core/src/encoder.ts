import type { GpuContext } from './context.js';
import type { Dispatch } from './kernel.js';
import { readBytes, type Tensor } from './tensor.js';

/**
 * Records a whole step (many dispatches, copies and clears) into one command encoder and submits
 * it once. Consecutive dispatches share a compute pass; WebGPU orders their storage accesses.
 *
 * With `timing: true` and the timestamp-query feature, every compute pass is timed on the GPU;
 * `gpuMilliseconds()` reads the total after submit. Without the feature, timing is a no-op and
 * `gpuMilliseconds()` resolves to undefined.
 */
export class StepEncoder {
  private readonly encoder: GPUCommandEncoder;
  private pass: GPUComputePassEncoder | undefined;
  private submitted = false;
  private readonly querySet: GPUQuerySet | undefined;
  private readonly maxPasses: number;
  private passes = 0;
  private dispatchCount = 0;
  private resolveBuffer: GPUBuffer | undefined;

  constructor(
    private readonly ctx: GpuContext,
    readonly label: string,
    options: { timing?: boolean; maxTimedPasses?: number } = {},
  ) {
    ctx.assertAlive();
    this.encoder = ctx.device.createCommandEncoder({ label });
    this.maxPasses = options.maxTimedPasses ?? 64;
    if (options.timing && ctx.features.timestampQuery) {
      this.querySet = ctx.device.createQuerySet({
        label: `${label}.timestamps`,
        type: 'timestamp',
        count: 2 * this.maxPasses,
      });
    }
  }

  private computePass(): GPUComputePassEncoder {
    if (!this.pass) {
      const desc: GPUComputePassDescriptor = { label: `${this.label}.pass${this.passes}` };
      if (this.querySet && this.passes < this.maxPasses) {
        desc.timestampWrites = {
          querySet: this.querySet,
          beginningOfPassWriteIndex: 2 * this.passes,
          endOfPassWriteIndex: 2 * this.passes + 1,
        };
      }
      this.passes++;
      this.pass = this.encoder.beginComputePass(desc);
    }
    return this.pass;
  }

  private endPass(): void {
    this.pass?.end();
    this.pass = undefined;
  }

  dispatch(...dispatches: Dispatch[]): this {
    this.assertOpen();
    const pass = this.computePass();
    for (const d of dispatches) d.record(pass);
    this.dispatchCount += dispatches.length;
    return this;
  }

  /** Copies `bytes` (default: as much as both hold) from src to dst, `dstOffset` bytes into dst. */
  copy(src: Tensor | GPUBuffer, dst: Tensor | GPUBuffer, bytes?: number, dstOffset = 0): this {
    this.assertOpen();
    this.endPass();
    const s = 'buffer' in src ? src.buffer : src;
    const d = 'buffer' in dst ? dst.buffer : dst;
    const so = 'buffer' in src ? src.byteOffset : 0;
    const dOff = ('buffer' in dst ? dst.byteOffset : 0) + dstOffset;
    const size = bytes ?? Math.min(s.size - so, d.size - dOff);
    this.encoder.copyBufferToBuffer(s, so, d, dOff, size);
    return this;
  }

  clear(target: Tensor | GPUBuffer): this {
    this.assertOpen();
    this.endPass();
    if ('buffer' in target) this.encoder.clearBuffer(target.buffer, target.byteOffset, target.bindingSize);
    else this.encoder.clearBuffer(target);
    return this;
  }

  /** Dispatches recorded so far. */
  get dispatches(): number {
    return this.dispatchCount;
  }

  /** Finishes and submits everything recorded, once. */
  submit(): void {
    this.assertOpen();
    this.endPass();
    if (this.querySet && this.passes > 0) {
      const count = Math.min(this.passes, this.maxPasses) * 2;
      this.resolveBuffer = this.ctx.createBuffer({
        label: `${this.label}.timestamps.resolve`,
        size: count * 8,
        usage: 0x200 /* QUERY_RESOLVE */ | 0x4 /* COPY_SRC */,
      });
      this.encoder.resolveQuerySet(this.querySet, 0, count, this.resolveBuffer, 0);
    }
    this.ctx.submit([this.encoder.finish()], this.dispatchCount);
    this.submitted = true;
  }

  /** Resolves when the GPU has finished this step (and everything submitted before it). */
  async done(): Promise<void> {
    await Promise.race([this.ctx.device.queue.onSubmittedWorkDone(), this.ctx.lost.then((e) => Promise.reject(e))]);
  }

  /** Sum of the timed passes' GPU durations, or undefined without timestamp queries. Releases
   * the query resources. */
  async gpuMilliseconds(): Promise<number | undefined> {
    if (!this.submitted) throw new Error(`${this.label}: gpuMilliseconds() before submit()`);
    if (!this.querySet || !this.resolveBuffer) return undefined;
    const count = Math.min(this.passes, this.maxPasses) * 2;
    try {
      const bytes = await readBytes(this.ctx, this.resolveBuffer, count * 8, `${this.label}.timestamps.read`);
      const ticks = new BigUint64Array(bytes);
      let ns = 0n;
      for (let i = 0; i < count; i += 2) {
        const begin = ticks[i] as bigint;
        const end = ticks[i + 1] as bigint;
        if (end > begin) ns += end - begin;
      }
      return Number(ns) / 1e6;
    } finally {
      this.disposeTiming();
    }
  }

  /** Releases timing resources without reading them. */
  disposeTiming(): void {
    if (this.resolveBuffer) this.ctx.releaseBuffer(this.resolveBuffer);
    this.resolveBuffer = undefined;
    this.querySet?.destroy();
  }

  private assertOpen(): void {
    if (this.submitted) throw new Error(`${this.label} was already submitted`);
    this.ctx.assertAlive();
  }
}
