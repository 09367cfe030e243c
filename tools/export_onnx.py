"""Exports a Hugging Face causal LM folder to ONNX in the layout transformers.js reads, for the
bench's generation peer (issue 10, item 7): transformers.js runs the same weights in the same
page as webtune, on the same WebGPU adapter.

    tools/.venv/bin/python tools/export_onnx.py <model folder> <out folder> [--dtype fp32,fp16]

<out folder> gets the model's config.json, generation_config.json and tokenizer files, and
onnx/model.onnx (fp32) and/or onnx/model_fp16.onnx (weights and compute in fp16), with the
inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key / .value and the outputs
logits, present.{i}.key / .value ([batch, kv_heads, past + seq, head_dim]), which is what
transformers.js's decoder loop feeds and expects (names as optimum's exports have them).

transformers.js's own conversion uses optimum-onnx, which this machine's wheel mirror does not
have; the export here traces transformers' own model (eager attention) with torch.onnx.export
instead. The graph is transformers' forward as written, without optimum's or onnxruntime's
offline fusions (onnxruntime still applies its session-time graph optimizations in the page).
Every export is checked with onnxruntime (CPU) against transformers: a prompt, then one more
token through the exported cache, logits within 1e-4 (fp32) or 5e-2 (fp16) of transformers in
float32; the script fails otherwise.
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


def export(src: Path, path: Path, dtype: torch.dtype) -> None:
    model = load(src, dtype, attn_implementation="eager")
    layers, kv_heads, head_dim = shapes(model.config)
    # Traced with a past of 3 and 2 new tokens, so that no length is a constant the tracer folds.
    past_len, seq = 3, 2
    ids = torch.tensor([[5, 9]], dtype=torch.int64)
    mask = torch.ones((1, past_len + seq), dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq, dtype=torch.int64)[None]
    past = [torch.randn(1, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    axes["position_ids"] = {0: "batch", 1: "seq"}
    axes["logits"] = {0: "batch", 1: "seq"}
    for n in past_names:
        axes[n] = {0: "batch", 2: "past"}
    for n in present_names:
        axes[n] = {0: "batch", 2: "total"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Decoder(model, layers),
            (ids, mask, pos, *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def check(src: Path, path: Path, tolerance: float) -> float:
    """Largest |logit difference| against transformers (float32) over a prompt and one cached step."""
    import onnxruntime as ort

    model = load(src, torch.float32)
    layers, kv_heads, head_dim = shapes(model.config)
    vocab = model.config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(11)]
    nxt = (prompt[-1] * 5 + 1) % vocab
    with torch.no_grad():
        want = model(torch.tensor([prompt + [nxt]])).logits[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    float_type = np.float16 if "float16" in session.get_inputs()[3].type else np.float32
    feed = {
        "input_ids": np.array([prompt], dtype=np.int64),
        "attention_mask": np.ones((1, len(prompt)), dtype=np.int64),
        "position_ids": np.arange(len(prompt), dtype=np.int64)[None],
    }
    for i in range(layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, kv_heads, 0, head_dim), dtype=float_type)
    names = [o.name for o in session.get_outputs()]
    first = dict(zip(names, session.run(None, feed)))
    feed = {
        "input_ids": np.array([[nxt]], dtype=np.int64),
        "attention_mask": np.ones((1, len(prompt) + 1), dtype=np.int64),
        "position_ids": np.array([[len(prompt)]], dtype=np.int64),
    }
    for n, v in first.items():
        if n.startswith("present."):
            feed[n.replace("present", "past_key_values")] = v
    second = dict(zip(names, session.run(None, feed)))
    got = np.concatenate([first["logits"][0], second["logits"][0]]).astype(np.float64)
    err = float(np.abs(got - want).max())
    print(f"  {path.name}: logits over {len(prompt)} + 1 cached tokens, max abs {err:.2e} against transformers (fp32)")
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
