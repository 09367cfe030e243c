export * from './adapter.js';
export * from './data/index.js';
export * from './lora/index.js';
export * from './memory.js';
export * from './merge.js';
export * from './random.js';
export * from './trainer.js';
