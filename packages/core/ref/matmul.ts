/**
 * Float64 references for the matrix kernels, written as plain loops from the math in
 * shaders/matmul.wgsl's header, without looking at how the WGSL tiles it.
 */

/** C[M×N] = opA(A)·opB(B): A stored M×K (or K×M if transA), B stored K×N (or N×K if transB). */
export function matmulRef(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  M: number,
  K: number,
  N: number,
  opts: { transA?: boolean; transB?: boolean } = {},
): Float64Array {
  const c = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let sum = 0;
      for (let k = 0; k < K; k++) {
        const av = opts.transA ? a[k * M + m] : a[m * K + k];
        const bv = opts.transB ? b[n * K + k] : b[k * N + n];
        sum += (av as number) * (bv as number);
      }
      c[m * N + n] = sum;
    }
  }
  return c;
}

export function addRef(a: ArrayLike<number>, b: ArrayLike<number>, alpha = 1): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = (a[i] as number) + alpha * (b[i] as number);
  return out;
}
