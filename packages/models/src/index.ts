export * from './errors.js';
export * from './safetensors.js';
export * from './source.js';
export * from './tokenizer.js';
export * from './weights.js';
