// LoRA configuration, target resolution, initialisation and the PEFT adapter format (CPU only; no
// GPU objects). The Python helpers in python.ts are internal.
export * from './config.js';
export * from './errors.js';
export * from './init.js';
export * from './peft-format.js';
export * from './targets.js';
