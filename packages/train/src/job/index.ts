// Training jobs for a cluster: a zip with the data, the adapter, job.json and a TRL + PEFT script
// (CPU only; no GPU objects).
export type { JobAdapter, JobModule } from './adapter.js';
export * from './build.js';
export * from './config.js';
export * from './data.js';
export * from './errors.js';
