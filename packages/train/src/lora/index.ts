export * from './config.js';
export * from './errors.js';
export * from './init.js';
export * from './peft-format.js';
export * from './python.js';
export * from './rng.js';
export * from './targets.js';
