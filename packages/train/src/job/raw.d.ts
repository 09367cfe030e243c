// The job script and its static texts are imported as text (`?raw`): Vite and vitest natively,
// tools/raw-import.mjs under Node, inlined by tools/build-packages.mjs in the published package.
declare module '*.py?raw' {
  const source: string;
  export default source;
}
declare module '*.md?raw' {
  const source: string;
  export default source;
}
declare module '*.txt?raw' {
  const source: string;
  export default source;
}
