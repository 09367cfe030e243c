// WGSL files are imported as text (Vite's ?raw; tools/raw-loader.mjs does the same under Node).
declare module '*.wgsl?raw' {
  const source: string;
  export default source;
}
