import treeSource from '../../../../shaders/group_reduce.wgsl?raw';
import subgroupSource from '../../../../shaders/group_reduce_subgroups.wgsl?raw';
import type { GpuContext } from '../context.js';

/** A kernel's WGSL with the group reductions it calls (group_sum, group_sum2, group_max) first. */
export interface GroupReduceSource {
  readonly source: string;
  readonly file: string;
}

/**
 * Both builds of a kernel file that calls the group reductions: with the workgroup-memory trees
 * (shaders/group_reduce.wgsl) and with subgroup operations (group_reduce_subgroups.wgsl, whose
 * `enable subgroups;` must come first in the module). Made once per file; `pick` chooses per device.
 */
export function withGroupReduce(file: string, source: string): (ctx: GpuContext) => GroupReduceSource {
  const tree = { source: `${treeSource}\n${source}`, file: `shaders/group_reduce.wgsl + ${file}` };
  const subgroups = {
    source: `${subgroupSource}\n${source}`,
    file: `shaders/group_reduce_subgroups.wgsl + ${file}`,
  };
  return (ctx) => (ctx.features.subgroups ? subgroups : tree);
}
