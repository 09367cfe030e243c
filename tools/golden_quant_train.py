"""Golden data for training LoRA on a block-quantized frozen base (QLoRA): for each model and each
of llama.cpp's Q8_0 and Q4_0, what transformers + PEFT compute (float32, CPU) on the same
quantized-then-dequantized weights that webtune's loadModel(..., { precision }) puts on the GPU:
packages/train/test/golden/quant-train/<model>.json and <model>.safetensors.

Run from the repository root (after `bash tools/setup-python.sh` and tools/make_tiny_models.py):

    tools/.venv/bin/python tools/golden_quant_train.py

The base weights, as webtune stores them at q8_0 / q4_0 (packages/models/src/precision.ts): every
linear module's weight whose input size is a multiple of 32 goes through the `gguf` package's
quantize and dequantize (ggml's reference quantizer, bit for bit; GPT-2's Conv1D weights are
transposed to [out, in] first, so blocks run along the input as in llama.cpp); every other matrix
(embeddings, learned positions, the LM head, a linear weight whose input is not a multiple of 32)
is rounded to f16. Norms and biases stay float32. Then, as tools/golden_peft_train.py does for
float32 bases: the fixed batch (2 x 12, labels with -100), a PEFT configuration "Q" (r 4, alpha 8,
all-linear, rsLoRA, dropout 0) with seeded random A and B (B not zero), one forward + backward in
train mode: the loss, row 0's logits and every lora_A / lora_B gradient.

<model>.json: the batch, per format the loss and the dtype every matrix was stored in, and the
modules; <model>.safetensors (float32): init.<key> (A, B), <fmt>.grad.<key>, <fmt>.logits_row0.
Deterministic: two runs write identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_peft_train import init_weights, lora_modules, lora_params  # noqa: E402
from hf_common import FIXTURES_DIR, REPO_ROOT, rel, save_safetensors, write_json  # noqa: E402
from peft_golden_common import (  # noqa: E402
    CONFIGS,
    MODELS,
    adapter_key,
    batch_tensors,
    collect_all_warnings,
    fixed_batch,
    load_base,
    lora_config,
    reference_loss,
    scaling,
    set_deterministic,
)

OUT_DIR = REPO_ROOT / "packages/train/test/golden/quant-train"
BLOCK = 32
QUANT_FIXTURES = ["tiny-llama-q", "tiny-qwen2-q", "tiny-qwen3-q", "tiny-gpt2-q"]
# Every architecture with real blocks (the tiny-*-q fixtures), plus tiny-llama3, whose sizes leave
# some weights f16 (down_proj's input is 40) and which has llama3 RoPE.
RUNS = [*QUANT_FIXTURES, "tiny-llama3"]
# Every linear module adapted (so the backward runs dy·W through every quantized weight), at a
# small rank to keep the files small.
CONFIG = "Q"
CONFIGS[CONFIG] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "targets_gpt2": "all-linear", "use_rslora": True}
for i, n in enumerate(QUANT_FIXTURES):
    MODELS[n] = (FIXTURES_DIR / n, "gpt2" if n.startswith("tiny-gpt2") else "tiny", 9101 + i)


def store_as_webtune(model: Any, fmt: str) -> dict[str, str]:
    """Replaces every matrix of `model` (in place) by what webtune keeps on the GPU at `fmt`;
    returns parameter name -> "q8_0" / "q4_0" / "f16" (named_parameters: a tied matrix once)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from transformers.pytorch_utils import Conv1D

    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[fmt]
    linear: dict[str, bool] = {}  # weight name -> stored transposed ([in, out], Conv1D)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            linear[f"{name}.weight"] = False
        elif isinstance(m, Conv1D):
            linear[f"{name}.weight"] = True
    kinds: dict[str, str] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            transposed = linear.get(name)
            w = p.detach().to(torch.float32)
            if transposed is not None:
                w_oi = w.t() if transposed else w  # [out, in]
                if w_oi.shape[1] % BLOCK == 0:
                    x = np.ascontiguousarray(w_oi.numpy(), dtype=np.float32)
                    back = dequantize(quantize(x, qtype), qtype).astype(np.float32)
                    q = torch.from_numpy(back.reshape(x.shape))
                    p.copy_(q.t() if transposed else q)
                    kinds[name] = fmt
                    continue
            p.copy_(w.half().float())
            kinds[name] = "f16"
    return kinds


def one_step(name: str, fmt: str, batch: dict, seed: int) -> dict[str, Any]:
    from peft import get_peft_model

    base, _ = load_base(name)
    kinds = store_as_webtune(base, fmt)
    with collect_all_warnings() as found:
        pm = get_peft_model(base, lora_config(CONFIG, base.config.model_type))
    if found:
        raise SystemExit(f"{name}: get_peft_model warned: {found}")
    init = init_weights(pm, seed)
    pm.train()
    x, y = batch_tensors(batch)
    out = pm(input_ids=x, labels=y)
    out.loss.backward()
    loss = out.loss.item()
    ref = float(reference_loss(out.logits.detach(), y))
    if abs(ref - loss) > 1e-6 * abs(ref):
        raise SystemExit(f"{name} {fmt}: loss {loss} != mean CE over counted tokens {ref}")
    grads = {k: p.grad.detach().clone() for k, p in lora_params(pm).items()}
    modules = []
    for path, m in lora_modules(pm):
        key = adapter_key(f"{path}.lora_A.default.weight").removesuffix(".lora_A.weight")
        modules.append(
            {
                "module": key.removeprefix("base_model.model."),
                "key_prefix": key,
                "in_features": int(m.in_features),
                "out_features": int(m.out_features),
                "r": int(m.r["default"]),
                "scaling": float(m.scaling["default"]),
            }
        )
    return {
        "loss": loss,
        "kinds": kinds,
        "init": init,
        "grads": grads,
        "logits_row0": out.logits.detach()[0].clone(),
        "modules": modules,
    }


def main() -> None:
    from importlib.metadata import version

    import torch

    set_deterministic()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(RUNS):
        _, tok = load_base(name)
        batch = fixed_batch(name, tok, load_base(name)[0].config.vocab_size)
        seed = 7700 + i
        tensors: dict[str, Any] = {}
        formats: dict[str, Any] = {}
        modules = None
        for fmt in ("q8_0", "q4_0"):
            r = one_step(name, fmt, batch, seed)
            if modules is None:
                modules = r["modules"]
                tensors.update({f"init.{k}": v for k, v in r["init"].items()})
            elif modules != r["modules"]:
                raise SystemExit(f"{name}: the LoRA modules differ between formats")
            tensors.update({f"{fmt}.grad.{k}": v for k, v in r["grads"].items()})
            tensors[f"{fmt}.logits_row0"] = r["logits_row0"]
            formats[fmt] = {"loss": r["loss"], "stored": r["kinds"]}
        if any(v.dtype != torch.float32 for v in tensors.values()):
            raise SystemExit("non-float32 golden tensor")
        save_safetensors(OUT_DIR / f"{name}.safetensors", tensors)
        record = {
            "model": name,
            "path": rel(MODELS[name][0]),
            "generated_by": {
                "script": "tools/golden_quant_train.py",
                "torch": torch.__version__,
                "transformers": version("transformers"),
                "peft": version("peft"),
                "gguf": version("gguf"),
            },
            "lora": {"config": CONFIG, "scaling": scaling(CONFIG), "seed": seed},
            "batch": batch,
            "formats": formats,
            "modules": modules,
        }
        write_json(OUT_DIR / f"{name}.json", record)
        counts = {f: sum(1 for k in formats[f]["stored"].values() if k == f) for f in formats}
        print(
            f"{name:13} q8_0 loss {formats['q8_0']['loss']:.6f}  q4_0 loss {formats['q4_0']['loss']:.6f}  "
            f"quantized matrices {counts['q8_0']}/{len(formats['q8_0']['stored'])}  "
            f"{(OUT_DIR / f'{name}.safetensors').stat().st_size:,} bytes"
        )


if __name__ == "__main__":
    main()
