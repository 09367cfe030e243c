/**
 * The worker entry: the engine, exposed through comlink. createTrainer() starts it with
 * `new Worker(new URL('./worker.js', import.meta.url), { type: 'module' })`, which Vite, webpack 5
 * and esbuild all bundle without a plugin. To host it yourself, start a module worker on
 * `@webtune/train/worker` and pass it as createTrainer({ worker }).
 */
import { expose } from 'comlink';
import { TrainerEngine } from './engine.js';
import { installErrorTransfer } from './transfer.js';

installErrorTransfer();
expose(new TrainerEngine());
