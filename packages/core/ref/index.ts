export * from './check.js';
export * from './lora.js';
export * from './matmul.js';
