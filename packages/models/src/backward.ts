/**
 * The backward pass of a causal LM with LoRA adapters, planned against a train-mode forward plan:
 * the chunked cross-entropy gives ∂L/∂hidden, then the final norm and every layer in reverse. The
 * frozen weights get no gradient; only the LoRA A and B matrices do (accumulated into their
 * gradient buffers, which the trainer clears after each optimizer step).
 *
 * One residual-gradient buffer runs through the layers: each norm's backward adds its input
 * gradient into it in place, which is exactly the residual connection's sum.
 */
import {
  type CrossEntropyGradPlan,
  createTensor,
  type Dispatch,
  fusedQkvLayout,
  type GpuContext,
  planAttentionBackward,
  planCopyRows,
  planCrossEntropyTraining,
  planGeluNewBackward,
  planLayerNormBackward,
  planLoraBackward,
  planMatmul,
  planRmsNormBackward,
  planRopeBackward,
  planSiluMulBackward,
  type Tensor,
} from '@webtune/core';
import type { LinearRole } from './architecture.js';
import { type ForwardPlan, type LayerActivations, loraDropout, type NormStats } from './forward.js';
import type { Layer, Linear, Norm } from './model.js';

/** One adapted module's trainable tensors and their gradients (views into arenas, usually). */
export interface LoraTrainable {
  /** [r, in] and [out, r]. */
  readonly a: Tensor;
  readonly b: Tensor;
  /** Gradients, same shapes: accumulated into (cleared by the trainer after each update). */
  readonly da: Tensor;
  readonly db: Tensor;
  readonly scale: number;
  /** LoRA dropout (see LoraModuleWeights). */
  readonly dropout?: { readonly p: number; readonly module: number };
}

export interface BackwardPlan {
  /** [B·T] i32 shifted targets: labels[t+1], -100 where no loss is taken. Write before submitting. */
  readonly labels: Tensor;
  /** f32 [2]: loss (sum / divisor) and the number of counted positions. */
  readonly loss: Tensor;
  /** u32 [2]: labels outside the vocabulary (see the cross-entropy kernel). */
  readonly errors: Tensor;
  /** The loss's plan, whose divisor the trainer sets per step (gradient accumulation). */
  readonly crossEntropy: CrossEntropyGradPlan;
  /** Loss forward + backward through every layer, in order. */
  readonly dispatches: readonly Dispatch[];
  readonly scratchBytes: number;
  dispose(): void;
}

class Scratch {
  readonly owned: Tensor[] = [];
  constructor(private readonly ctx: GpuContext) {}
  f32(shape: number[], label: string): Tensor {
    const t = createTensor(this.ctx, shape, 'f32', `backward.${label}`);
    this.owned.push(t);
    return t;
  }
}

export async function planBackward(
  ctx: GpuContext,
  fwd: ForwardPlan,
  lora: ReadonlyMap<string, LoraTrainable>,
): Promise<BackwardPlan> {
  if (fwd.mode !== 'train') throw new Error('planBackward needs a forward plan made with mode "train"');
  const model = fwd.model;
  const c = model.config;
  const rows = fwd.rows;
  const { B, T } = fwd;
  const d = c.hiddenSize;
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const I = c.intermediateSize;
  const s = new Scratch(ctx);
  const out: Dispatch[] = [];
  let ce: CrossEntropyGradPlan | undefined;
  try {
    const labels = createTensor(ctx, [rows], 'i32', 'backward.labels');
    s.owned.push(labels);
    const loss = s.f32([2], 'loss');
    const errors = createTensor(ctx, [2], 'u32', 'backward.loss_errors');
    s.owned.push(errors);
    const lse = s.f32([rows], 'lse');
    const dHidden = s.f32([rows, d], 'd_hidden');
    ce = await planCrossEntropyTraining(
      ctx,
      { h: fwd.hidden, e: model.lmHead, labels, lse, loss, errors, dh: dHidden },
      { label: 'loss' },
    );
    out.push(...ce.dispatches);

    // Shared across layers: the backward handles one layer at a time.
    const dResid = s.f32([rows, d], 'd_resid');
    const dNorm = s.f32([rows, d], 'd_norm_out');
    const dAct = s.f32([rows, I], 'd_act');
    const dGate = s.f32([rows, I], 'd_gate');
    const dUp = c.family === 'gpt2' ? undefined : s.f32([rows, I], 'd_up');
    const dAttn = s.f32([rows, qDim], 'd_attn');
    const dq = s.f32([rows, qDim], 'dq');
    const dk = s.f32([rows, kvDim], 'dk');
    const dv = s.f32([rows, kvDim], 'dv');
    const delta = s.f32([B, c.numHeads, T], 'attention_delta');
    const dqRaw = c.qkNorm ? s.f32([rows, qDim], 'dq_raw') : undefined;
    const dkRaw = c.qkNorm ? s.f32([rows, kvDim], 'dk_raw') : undefined;
    const dqkv = c.family === 'gpt2' ? s.f32([rows, 3 * d], 'dqkv') : undefined;
    const zero = c.family === 'gpt2' ? createTensor(ctx, [1], 'i32', 'backward.zero') : undefined;
    if (zero) s.owned.push(zero);
    const gByRank = new Map<number, Tensor>();
    const g = (r: number) => {
      let t = gByRank.get(r);
      if (!t) {
        t = s.f32([rows, r], `lora_g_r${r}`);
        gByRank.set(r, t);
      }
      return t;
    };

    const normBackward = async (
      norm: Norm,
      x: Tensor,
      stats: NormStats,
      dy: Tensor,
      dx: Tensor,
      accumulate: boolean,
      label: string,
    ) => {
      const eps = c.norm.eps;
      if (c.norm.kind === 'layer') {
        return planLayerNormBackward(
          ctx,
          { x, w: norm.w, mean: stats.mean as Tensor, rstd: stats.rstd, dy, dx },
          { eps, accumulate, label },
        );
      }
      return planRmsNormBackward(ctx, { x, w: norm.w, rstd: stats.rstd, dy, dx }, { eps, accumulate, label });
    };

    /** dx (+)= dy·W for one projection, and the LoRA gradients when it is adapted. */
    const linearBackward = async (
      layer: Layer,
      a: LayerActivations,
      role: LinearRole,
      x: Tensor,
      dy: Tensor,
      dx: Tensor,
      accumulate: boolean,
    ) => {
      const lin = layer.linears[role] as Linear;
      const t = lora.get(lin.module.name);
      if (t) {
        const h = a.loraH.get(role) as Tensor;
        const d = loraDropout(t, fwd.dropout, x);
        out.push(
          ...(await planLoraBackward(
            ctx,
            { w0: lin.w, a: t.a, b: t.b, bias: lin.bias, scale: t.scale },
            { x, h, dy, g: g(t.a.shape[0] as number), dx, da: t.da, db: t.db, ...(d ? { dropout: d } : {}) },
            { accumulateDx: accumulate, accumulateGrads: true },
            lin.module.name,
          )),
        );
      } else {
        out.push(
          await planMatmul(ctx, dy, lin.w, dx, {
            transW: false,
            beta: accumulate ? 1 : 0,
            label: `${lin.module.name}.dx`,
          }),
        );
      }
    };

    const last = fwd.layers[fwd.layers.length - 1] as LayerActivations;
    out.push(await normBackward(model.finalNorm, last.out, fwd.finalStats, dHidden, dResid, false, 'final_norm'));

    const replayed = new Set<Dispatch>();
    for (let i = c.numLayers - 1; i >= 0; i--) {
      const layer = model.layers[i] as Layer;
      const a = fwd.layers[i] as LayerActivations;
      const p = `layer${i}`;
      if (fwd.recompute && i < c.numLayers - 1) {
        // The shared activations hold the last layer's forward: rerun this layer's (from its
        // saved input) before differentiating it. The forward plan owns these dispatches.
        for (const dsp of fwd.layerDispatches[i] ?? []) {
          out.push(dsp);
          replayed.add(dsp);
        }
      }
      // MLP: out = mid + down(act(...)); dResid holds ∂L/∂out.
      await linearBackward(layer, a, 'down', a.act, dResid, dAct, false);
      if (c.family === 'gpt2') {
        out.push(await planGeluNewBackward(ctx, { x: a.gate, dy: dAct, dx: dGate }, `${p}.gelu`));
        await linearBackward(layer, a, 'fc', a.n2, dGate, dNorm, false);
      } else {
        out.push(
          await planSiluMulBackward(
            ctx,
            { gate: a.gate, up: a.up as Tensor, dout: dAct, dgate: dGate, dup: dUp as Tensor },
            `${p}.silu_mul`,
          ),
        );
        await linearBackward(layer, a, 'gate', a.n2, dGate, dNorm, false);
        await linearBackward(layer, a, 'up', a.n2, dUp as Tensor, dNorm, true);
      }
      // The residual: ∂L/∂mid = ∂L/∂out + norm2's backward, added in place.
      out.push(await normBackward(layer.norm2, a.mid, a.n2Stats, dNorm, dResid, true, `${p}.norm2`));

      // Attention: mid = x + o(attention(q, k, v)).
      await linearBackward(layer, a, 'o', a.attn, dResid, dAttn, false);
      const dims = { B, Tq: T, Tk: T, pos0: 0, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim };
      if (c.family === 'gpt2') {
        const qkv = a.qkv as Tensor;
        const layouts = fusedQkvLayout({ T, nH: c.numHeads, nKV: c.numKvHeads, hd: c.headDim });
        out.push(
          ...(await planAttentionBackward(
            ctx,
            {
              q: qkv,
              k: qkv,
              v: qkv,
              o: a.attn,
              lse: a.lse,
              do: dAttn,
              dq,
              dk,
              dv,
              delta,
              dims: { ...dims, ...layouts },
            },
            `${p}.attention`,
          )),
        );
        // Interleave dq, dk, dv back into c_attn's [rows, 3d] layout.
        for (const [j, src] of [dq, dk, dv].entries()) {
          out.push(
            await planCopyRows(
              ctx,
              src,
              zero as Tensor,
              dqkv as Tensor,
              { rows, cols: d, dstStride: 3 * d, dstOffset: j * d },
              0,
              `${p}.dqkv${j}`,
            ),
          );
        }
        await linearBackward(layer, a, 'qkv', a.n1, dqkv as Tensor, dNorm, false);
      } else {
        out.push(
          ...(await planAttentionBackward(
            ctx,
            {
              q: a.q as Tensor,
              k: a.k as Tensor,
              v: a.v as Tensor,
              o: a.attn,
              lse: a.lse,
              do: dAttn,
              dq,
              dk,
              dv,
              delta,
              dims,
            },
            `${p}.attention`,
          )),
        );
        const rope = { headDim: c.headDim, T, pos0: 0, attentionScaling: model.ropeAttentionScaling };
        const invFreq = model.ropeInvFreq as Tensor;
        out.push(
          await planRopeBackward(ctx, dq, invFreq, { ...rope, nHeads: c.numHeads, label: `${p}.rope_q` }),
          await planRopeBackward(ctx, dk, invFreq, { ...rope, nHeads: c.numKvHeads, label: `${p}.rope_k` }),
        );
        let dqIn = dq;
        let dkIn = dk;
        if (c.qkNorm) {
          const eps = c.norm.eps;
          const qs = a.qNormStats as NormStats;
          const ks = a.kNormStats as NormStats;
          out.push(
            await planRmsNormBackward(
              ctx,
              { x: a.qRaw as Tensor, w: layer.qNorm as Tensor, rstd: qs.rstd, dy: dq, dx: dqRaw as Tensor },
              { eps, groups: c.numHeads, label: `${p}.q_norm` },
            ),
            await planRmsNormBackward(
              ctx,
              { x: a.kRaw as Tensor, w: layer.kNorm as Tensor, rstd: ks.rstd, dy: dk, dx: dkRaw as Tensor },
              { eps, groups: c.numKvHeads, label: `${p}.k_norm` },
            ),
          );
          dqIn = dqRaw as Tensor;
          dkIn = dkRaw as Tensor;
        }
        await linearBackward(layer, a, 'q', a.n1, dqIn, dNorm, false);
        await linearBackward(layer, a, 'k', a.n1, dkIn, dNorm, true);
        await linearBackward(layer, a, 'v', a.n1, dv, dNorm, true);
      }
      // ∂L/∂x = ∂L/∂mid + norm1's backward: dResid becomes the previous layer's ∂L/∂out.
      out.push(await normBackward(layer.norm1, a.x, a.n1Stats, dNorm, dResid, true, `${p}.norm1`));
    }
    const scratchBytes = s.owned.reduce((n, t) => n + t.byteLength, 0) + ce.scratchBytes;
    const plan = ce;
    return {
      labels,
      loss,
      errors,
      crossEntropy: plan,
      dispatches: out,
      scratchBytes,
      dispose() {
        for (const x of new Set(out)) if (!plan.dispatches.includes(x) && !replayed.has(x)) x.dispose();
        plan.dispose();
        for (const t of s.owned) t.dispose();
      },
    };
  } catch (e) {
    for (const x of new Set(out)) if (!ce?.dispatches.includes(x) && !fwd.dispatches.includes(x)) x.dispose();
    ce?.dispose();
    for (const t of s.owned) t.dispose();
    throw e;
  }
}

/** The model's input for a batch: ids, and the shifted targets the loss reads. */
export function shiftLabels(labels: ArrayLike<number>, B: number, T: number): Int32Array {
  const out = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) out[b * T + t] = t + 1 < T ? (labels[b * T + t + 1] as number) : -100;
  }
  return out;
}
