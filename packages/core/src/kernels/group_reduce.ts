import treeSource from '../../../../shaders/group_reduce.wgsl?raw';
import subgroupSource from '../../../../shaders/group_reduce_subgroups.wgsl?raw';
import type { GpuContext } from '../context.js';
import { composeShader, type ShaderPart } from './compose.js';

const TREE: ShaderPart = { file: 'shaders/group_reduce.wgsl', source: treeSource };
const SUBGROUPS: ShaderPart = { file: 'shaders/group_reduce_subgroups.wgsl', source: subgroupSource };

/**
 * Both builds of a kernel file that calls the group reductions (group_sum, group_sum2,
 * group_max, group_sum4x4): after the workgroup-memory trees (shaders/group_reduce.wgsl), or after their
 * subgroup twins (group_reduce_subgroups.wgsl) with subgroups enabled. Made once per file; the
 * returned function picks the build for a device.
 */
export function withGroupReduce(file: string, source: string): (ctx: GpuContext) => ShaderPart {
  const kernel = { file, source };
  const tree = composeShader([], [TREE, kernel]);
  const subgroups = composeShader(['subgroups'], [SUBGROUPS, kernel]);
  return (ctx) => (ctx.features.subgroups ? subgroups : tree);
}
