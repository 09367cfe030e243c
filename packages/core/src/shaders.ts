// Every WGSL file the core kernels use, imported as text from the top-level shaders/ folder.
import elementwise from '../../../shaders/elementwise.wgsl?raw';
import loraMatmul from '../../../shaders/lora_matmul.wgsl?raw';
import matmul from '../../../shaders/matmul.wgsl?raw';

export const shaders = {
  elementwise: { file: 'shaders/elementwise.wgsl', source: elementwise },
  loraMatmul: { file: 'shaders/lora_matmul.wgsl', source: loraMatmul },
  matmul: { file: 'shaders/matmul.wgsl', source: matmul },
} as const;
