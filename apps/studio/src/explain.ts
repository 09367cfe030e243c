/**
 * Errors in plain words: what happened and what to do, by the error's class name (the engine's
 * typed errors keep their names across the worker).
 */
export function explain(error: unknown): { title: string; detail: string } {
  const e = error as { name?: string; message?: string };
  const name = e?.name ?? '';
  const message = e?.message ?? String(error);
  switch (name) {
    case 'WebGpuUnavailableError':
      return {
        title: 'This browser cannot use your GPU (no WebGPU)',
        detail:
          'Open the studio in Chrome or Edge 113 or newer. On Linux, start Chrome or Chromium with --enable-unsafe-webgpu; in Firefox and Safari, WebGPU must be switched on in their settings. ' +
          message,
      };
    case 'OutOfMemoryError':
    case 'LimitExceededError':
    case 'MemoryBudgetError':
      return {
        title: 'Not enough GPU memory for this setting',
        detail: `Lower the sequence length or the batch size, choose a smaller rank or fewer target modules, or turn on recomputation. (${message})`,
      };
    case 'HubRepoError':
    case 'ModelFileError':
    case 'ConfigError':
    case 'ModelLoadError':
    case 'SafetensorsError':
    case 'TokenizerError':
      return {
        title: /not supported/.test(message) ? 'This model is not supported' : 'The model could not be loaded',
        detail: `${message}. webtune trains Llama (SmolLM2, TinyLlama, Llama 3.2), Qwen2.5, Qwen3 and GPT-2 models with safetensors weights.`,
      };
    case 'DataError':
      return { title: 'There is a problem in the data file', detail: message };
    case 'StorageQuotaError':
      return {
        title: 'Browser storage is full',
        detail: `Delete adapters or cached models you no longer need, then try again. Nothing saved before was lost. (${message})`,
      };
    case 'TrainerBusyError':
      return { title: 'Another tab is training', detail: message };
    case 'TrainingDivergedError':
      return {
        title: 'Training diverged',
        detail: `${message}. The last checkpoint is kept; lower the learning rate and start again.`,
      };
    case 'TrainConfigError':
      return { title: 'A setting cannot be used', detail: message };
    case 'DeviceLostError':
      return { title: 'The GPU was reset', detail: `${message}. Reload the page; interrupted runs can be resumed.` };
    default:
      return { title: 'Something went wrong', detail: message };
  }
}
