import source from '../../../shaders/probe_subgroups.wgsl?raw';

/** What the probe saw of the adapter's subgroups on a 1-D workgroup. */
export interface SubgroupLayout {
  /** Every subgroup is a run of consecutive local_invocation_index values, id = index % size. */
  readonly contiguous: boolean;
  /** The subgroup size the probe's pipeline got (0 when the probe failed). */
  readonly size: number;
}

const NONE: SubgroupLayout = { contiguous: false, size: 0 };

/**
 * Runs shaders/probe_subgroups.wgsl once on `device` (which must have the 'subgroups' feature) and
 * checks the layout the reduction kernels assume (group_reduce_subgroups.wgsl). A compile or
 * validation failure counts as "not contiguous": the kernels then keep their workgroup-memory trees.
 * Its buffers are destroyed before it returns.
 */
export async function measureSubgroupLayout(device: GPUDevice, workgroupSize: number): Promise<SubgroupLayout> {
  const bytes = workgroupSize * 2 * 4;
  const out = device.createBuffer({
    label: 'probe_subgroups.out',
    size: bytes,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
  });
  const read = device.createBuffer({
    label: 'probe_subgroups.read',
    size: bytes,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  let layout: SubgroupLayout = NONE;
  try {
    device.pushErrorScope('validation');
    try {
      const module = device.createShaderModule({ label: 'probe_subgroups', code: source });
      const pipeline = await device.createComputePipelineAsync({
        label: 'probe_subgroups',
        layout: 'auto',
        compute: { module, entryPoint: 'main', constants: { WG: workgroupSize } },
      });
      const enc = device.createCommandEncoder({ label: 'probe_subgroups' });
      const pass = enc.beginComputePass();
      pass.setPipeline(pipeline);
      const entries = [{ binding: 0, resource: { buffer: out } }];
      pass.setBindGroup(0, device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries }));
      pass.dispatchWorkgroups(1);
      pass.end();
      enc.copyBufferToBuffer(out, 0, read, 0, bytes);
      device.queue.submit([enc.finish()]);
      await read.mapAsync(GPUMapMode.READ);
      layout = subgroupLayoutOf(new Uint32Array(read.getMappedRange().slice(0)));
      read.unmap();
    } catch {
      layout = NONE;
    }
    if (await device.popErrorScope()) layout = NONE;
  } finally {
    out.destroy();
    read.destroy();
  }
  return layout;
}

/** Reads the probe's output: (id, size) per local_invocation_index. Exported for its unit test. */
export function subgroupLayoutOf(seen: Uint32Array): SubgroupLayout {
  const size = seen[1] ?? 0;
  const powerOfTwo = size >= 4 && size <= 128 && (size & (size - 1)) === 0;
  let contiguous = powerOfTwo && seen.length >= 2;
  for (let tid = 0; contiguous && tid * 2 < seen.length; tid++) {
    if (seen[2 * tid + 1] !== size || seen[2 * tid] !== tid % size) contiguous = false;
  }
  return { contiguous, size };
}
