export * from './data/index.js';
export * from './lora/index.js';
export * from './trainer.js';
export * from './adapter.js';
