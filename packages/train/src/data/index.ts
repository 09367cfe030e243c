export * from './batches.js';
export * from './dataset.js';
export * from './errors.js';
export * from './examples.js';
export * from './jsonl.js';
export * from './random.js';
export * from './stats.js';
