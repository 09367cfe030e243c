// WGSL files are imported as text: Vite's ?raw in the studio and tests, tools/raw-import.mjs under
// Node (the CLI), and tools/build-packages.mjs inlines them into the published packages.
declare module '*.wgsl?raw' {
  const source: string;
  export default source;
}
