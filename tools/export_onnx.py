"""Exports a Hugging Face causal LM folder to ONNX in the layout transformers.js reads, for the
bench's generation peer (issue 10, item 7): transformers.js runs the same weights in the same
page as webtune, on the same WebGPU adapter.

    tools/.venv/bin/python tools/export_onnx.py <model folder> <out folder> [--dtype fp32,fp16]

<out folder> gets the model's config.json, generation_config.json and tokenizer files, and
onnx/model.onnx (fp32) and/or onnx/model_fp16.onnx (weights and activations in fp16, with
transformers' own upcasts to fp32 in the norms and softmax), with the
inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key / .value and the outputs
logits, present.{i}.key / .value ([batch, kv_heads, past + seq, head_dim]), which is what
transformers.js's decoder loop feeds and expects (names as optimum's exports have them).

transformers.js's own conversion uses optimum-onnx, which this machine's wheel mirror does not
have; the export here traces transformers' own model (eager attention) with torch.onnx.export
instead. The graph is transformers' forward as written, without optimum's or onnxruntime's
offline fusions (onnxruntime still applies its session-time graph optimizations in the page).
Every export is checked with onnxruntime (CPU) against transformers: two prompts, one
left-padded, then one more token each through the exported cache, fed as transformers.js feeds
them; logits within 1e-4 (fp32) or 5e-2 (fp16) of transformers in float32, or the script fails.
That proves the graph, not onnxruntime-web's WebGPU kernels: the bench compares the page's greedy
ids with PyTorch's for that. Constant folding stores the tied embedding twice (once transposed
for the head), so model.onnx is larger than the weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from transformers.utils import logging as tf_logging

COPIED = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


class Decoder(torch.nn.Module):
    """transformers' model behind the flat signature of an optimum decoder export."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def load(src: Path, dtype: torch.dtype, **kwargs):
    tf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    model.eval()
    return model


def shapes(config) -> tuple[int, int, int]:
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers, kv_heads, head_dim


def position_ids(mask: np.ndarray, new: int) -> np.ndarray:
    """Positions of the last `new` columns of `mask`, as transformers.js computes them: the running
    count of real tokens less one, and 1 on padding."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos[:, -new:]


def export(src: Path, path: Path, dtype: torch.dtype) -> None:
    model = load(src, dtype, attn_implementation="eager")
    layers, kv_heads, head_dim = shapes(model.config)
    # Traced on two rows, a past of 3 and 2 new tokens, the second row left-padded, so that no
    # size is a constant the tracer folds and the mask takes its general path.
    batch, past_len, seq = 2, 3, 2
    ids = torch.tensor([[5, 9], [6, 10]], dtype=torch.int64)
    mask = np.ones((batch, past_len + seq), dtype=np.int64)
    mask[1, 0] = 0
    pos = torch.from_numpy(position_ids(mask, seq))
    past = [torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    # optimum's axis names: transformers.js sizes the empty past of the first step from them
    # (batch_size; any name it does not know becomes 0).
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for n in past_names:
        axes[n] = {0: "batch_size", 2: "past_sequence_length"}
    for n in present_names:
        axes[n] = {0: "batch_size", 2: "total_sequence_length"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Decoder(model, layers),
            (ids, torch.from_numpy(mask), pos, *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def check(src: Path, path: Path, tolerance: float) -> float:
    """Largest |logit difference| against transformers (float32, each row alone, no padding) over
    a prompt and one step through the exported cache, on two rows, the second one left-padded,
    fed as transformers.js feeds them (the first step's past empty, sized from the axis names)."""
    import onnxruntime as ort

    model = load(src, torch.float32)
    layers, kv_heads, head_dim = shapes(model.config)
    vocab = model.config.vocab_size
    rows = [[(7 * i + 3) % vocab for i in range(11)], [(5 * i + 4) % vocab for i in range(7)]]
    nxt = [(r[-1] * 5 + 1) % vocab for r in rows]
    width = max(len(r) for r in rows)
    with torch.no_grad():
        want = [model(torch.tensor([r + [n]])).logits[0].numpy() for r, n in zip(rows, nxt)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_input = next(i for i in session.get_inputs() if i.name.startswith("past_key_values."))
    float_type = np.float16 if "float16" in past_input.type else np.float32
    sizes = {"batch_size": len(rows)}
    empty = tuple(sizes.get(d, 0) if isinstance(d, str) else d for d in past_input.shape)
    if empty != (len(rows), kv_heads, 0, head_dim):
        raise SystemExit(f"{path}: an empty past sized from the axis names is {empty}")
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    feed = {
        "input_ids": np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64),
        "attention_mask": mask,
        "position_ids": position_ids(mask, width),
    }
    for i in range(layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros(empty, dtype=float_type)
    names = [o.name for o in session.get_outputs()]
    first = dict(zip(names, session.run(None, feed)))
    mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
    feed = {
        "input_ids": np.array([[n] for n in nxt], dtype=np.int64),
        "attention_mask": mask,
        "position_ids": position_ids(mask, 1),
    }
    for n, v in first.items():
        if n.startswith("present."):
            feed[n.replace("present", "past_key_values")] = v
    second = dict(zip(names, session.run(None, feed)))
    err = 0.0
    for b, r in enumerate(rows):
        got = np.concatenate([first["logits"][b, width - len(r) :], second["logits"][b]]).astype(np.float64)
        err = max(err, float(np.abs(got - want[b]).max()))
    print(
        f"  {path.name}: logits of {len(rows)} rows ({' and '.join(str(len(r)) for r in rows)} tokens, left-padded)"
        f" + 1 cached token, max abs {err:.2e} against transformers (fp32)"
    )
    if not err <= tolerance:
        raise SystemExit(f"{path}: logits differ from transformers by {err:.3e} (> {tolerance})")
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="fp32,fp16")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (a.src / name).exists():
            shutil.copyfile(a.src / name, a.out / name)
    for d in a.dtype.split(","):
        if d not in ("fp32", "fp16"):
            raise SystemExit(f"--dtype: {d} is not fp32 or fp16")
        path = a.out / "onnx" / ("model.onnx" if d == "fp32" else "model_fp16.onnx")
        export(a.src, path, torch.float32 if d == "fp32" else torch.float16)
        check(a.src, path, 1e-4 if d == "fp32" else 5e-2)
    print(f"exported {a.src} to {a.out}")


if __name__ == "__main__":
    sys.exit(main())
