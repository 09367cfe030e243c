export * from './activations.js';
export * from './check.js';
export * from './embedding.js';
export * from './layernorm.js';
export * from './lora.js';
export * from './matmul.js';
export * from './rmsnorm.js';
export * from './rope.js';
