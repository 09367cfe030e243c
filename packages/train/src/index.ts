export * from './data/index.js';
export * from './lora/index.js';
