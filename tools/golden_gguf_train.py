"""Golden data for GGUF base models: for each file of packages/models/test/fixtures/gguf/, what
transformers + PEFT compute (float32, CPU) on the weights webtune's loadModel(..., { gguf })
keeps on the GPU: packages/train/test/golden/gguf-train/<run>.json and <run>.safetensors.

Run from the repository root (after tools/make_gguf_fixtures.py):

    tools/.venv/bin/python tools/golden_gguf_train.py

The reference model is transformers' own GGUF loader (from_pretrained(..., gguf_file=...): its
names, its un-permutation of Llama's q and k, the gguf package's dequantization), independent of
webtune's. llama.cpp's Llama 3 RoPE divisors (rope_freqs), which transformers ignores, are applied
to the rotary embedding's inverse frequencies as llama.cpp applies them. Then each matrix is
replaced by what webtune stores (gguf-model.ts): without a precision, linear weights keep Q8_0 and
Q4_0 as they are, k-quants (Q4_K, Q6_K) go through Q8_0 and F32/F16/BF16 through f16, and
embeddings and the LM head are rounded to f16; with an explicit precision (run ".as-q4_0") every
linear weight is quantized to it from its exact values. For the tiny-*-q files the loaded weights
are first checked against the safetensors fixtures they were made from (within the quantization
error), which catches a wrong name or permutation on either side.

As golden_quant_train.py: the fixed batch (2 x 12), PEFT r 4, alpha 8, all-linear, rsLoRA,
seeded A and B, one step in train mode: loss, row 0's logits and every LoRA gradient; for the
GPT-2 file also transformers' tokenization (from the GGUF metadata) of a few sentences.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_peft_train import init_weights, lora_modules, lora_params  # noqa: E402
from hf_common import FIXTURES_DIR, REPO_ROOT, collect_warnings, rel, save_safetensors, write_json  # noqa: E402
from peft_golden_common import (  # noqa: E402
    CONFIGS,
    MODELS,
    adapter_key,
    batch_tensors,
    fixed_batch,
    lora_config,
    reference_loss,
    scaling,
    set_deterministic,
)

GGUF_DIR = FIXTURES_DIR / "gguf"
OUT_DIR = REPO_ROOT / "packages/train/test/golden/gguf-train"
CONFIG = "Q"
CONFIGS[CONFIG] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "targets_gpt2": "all-linear", "use_rslora": True}
# run -> (folder, file, the safetensors fixture it was made from or None, explicit precision)
RUNS: dict[str, tuple[str, str, str | None, str | None]] = {
    "tiny-llama-q": ("stories", "tiny-llama-q.gguf", "tiny-llama-q", None),
    "tiny-qwen2-q": ("stories", "tiny-qwen2-q.gguf", "tiny-qwen2-q", None),
    "tiny-qwen3-q": ("stories", "tiny-qwen3-q.gguf", "tiny-qwen3-q", None),
    "tiny-qwen3-q.as-q4_0": ("stories", "tiny-qwen3-q.gguf", "tiny-qwen3-q", "q4_0"),
    "tiny-llama-k": ("stories", "tiny-llama-k.gguf", None, None),
    "tiny-gpt2-q": ("gpt2", "tiny-gpt2-q.gguf", "tiny-gpt2-q", None),
}
SENTENCES = ["First Citizen:\nBefore we proceed", "  two  spaces, and\ttabs\n\nand 12345 digits!", "All: Speak, speak."]
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
}
LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def gguf_name(key: str) -> str | None:
    if key in GLOBAL:
        return GLOBAL[key]
    parts = key.split(".")
    if parts[0] in ("model", "transformer") and parts[1] in ("layers", "h"):
        module = ".".join(parts[3:-1])
        return f"blk.{parts[2]}.{LAYER[module]}.{parts[-1]}" if module in LAYER else None
    return None


def round_trip(x: Any, fmt: str) -> Any:
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    qt = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[fmt]
    a = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    return torch.from_numpy(dequantize(quantize(a, qt), qt).astype(np.float32).reshape(a.shape))


def store_as_webtune(model: Any, types: dict[str, str], precision: str | None) -> dict[str, str]:
    """Replaces the matrices by what webtune stores; returns parameter name -> dtype."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linear: dict[str, bool] = {}
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
            src = types[gguf_name(name) or "?"]
            transposed = linear.get(name)
            w = p.detach().to(torch.float32)
            w_oi = w.t() if transposed else w
            if transposed is not None and w_oi.shape[1] % 32 == 0:
                fmt = precision or {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_K": "q8_0", "Q6_K": "q8_0"}.get(src)
                if fmt is not None:
                    same = precision is None and src in ("Q8_0", "Q4_0")
                    q = w_oi if same else round_trip(w_oi, fmt)
                    p.copy_(q.t() if transposed else q)
                    kinds[name] = fmt
                    continue
            if precision == "f32":
                kinds[name] = "f32"
                continue
            p.copy_(w.half().float())
            kinds[name] = "f16"
    return kinds


def load(folder: str, file: str) -> tuple[Any, dict[str, str]]:
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    path = GGUF_DIR / folder / file
    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    overrides = {}
    key = reader.fields.get(f"{arch}.attention.key_length")
    if arch == "qwen3" and key is not None:
        # transformers' GGUF config mapping leaves Qwen3's head_dim at its default (128); the
        # file gives it in attention.key_length, as llama.cpp reads it.
        overrides["head_dim"] = int(key.parts[-1][0])
    ffn = reader.fields.get("gpt2.feed_forward_length")
    if arch == "gpt2" and ffn is not None:
        # Likewise GPT-2's n_inner (transformers assumes 4 · n_embd) and n_positions (it maps
        # context_length to n_ctx, which GPT2Config does not use for the position table).
        overrides["n_inner"] = int(ffn.parts[-1][0])
        overrides["n_positions"] = int(reader.fields["gpt2.context_length"].parts[-1][0])
        # GGUF carries no dropout; GPT2Config's defaults (0.1) would drop in train mode.
        overrides.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with collect_warnings():
        config = AutoConfig.from_pretrained(str(GGUF_DIR / folder), gguf_file=file, **overrides)
        model = AutoModelForCausalLM.from_pretrained(
            str(GGUF_DIR / folder), gguf_file=file, config=config, dtype=torch.float32
        )
    if model.loss_type is None:
        model.loss_type = "ForCausalLM"
    rope = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if rope:
        # llama.cpp divides each rotary frequency by its factor (Llama 3 scaling).
        div = torch.from_numpy(np.array(rope[0].data, dtype=np.float32))
        emb = model.model.rotary_emb
        emb.inv_freq = emb.inv_freq / div
        emb.original_inv_freq = emb.inv_freq
    model.eval()
    return model, types


def check_against_source(model: Any, source: str) -> float:
    """Largest |w_gguf - w_fixture| / max|w_fixture| over the matrices (quantization error only)."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(FIXTURES_DIR / source / "model.safetensors"))
    worst = 0.0
    for name, p in model.named_parameters():
        ref = sd.get(name)
        if ref is None:
            continue
        ref = ref.to(torch.float32)
        err = float((p.detach() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        worst = max(worst, err)
    if worst > 0.15:
        raise SystemExit(f"{source}: GGUF weights differ from the fixture by {worst:.3f} (a wrong mapping?)")
    return worst


def main() -> None:
    from importlib.metadata import version

    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    set_deterministic()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for i, (run, (folder, file, source, precision)) in enumerate(RUNS.items()):
        model, types = load(folder, file)
        worst = check_against_source(model, source) if source else None
        MODELS[run] = (GGUF_DIR / folder, "gpt2" if folder == "gpt2" else "tiny", 9201 + i)
        if folder == "gpt2":
            tok = AutoTokenizer.from_pretrained(str(GGUF_DIR / folder), gguf_file=file)
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(GGUF_DIR / folder / "tokenizer.json"))
        batch = fixed_batch(run, tok, model.config.vocab_size)
        kinds = store_as_webtune(model, types, precision)
        pm = get_peft_model(model, lora_config(CONFIG, model.config.model_type))
        seed = 7800 + i
        init = init_weights(pm, seed)
        pm.train()
        x, y = batch_tensors(batch)
        out = pm(input_ids=x, labels=y)
        out.loss.backward()
        loss = out.loss.item()
        ref = float(reference_loss(out.logits.detach(), y))
        if abs(ref - loss) > 1e-6 * abs(ref):
            raise SystemExit(f"{run}: loss {loss} != mean CE {ref}")
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
        tensors = {f"init.{k}": v for k, v in init.items()}
        tensors.update({f"grad.{k}": v for k, v in grads.items()})
        tensors["logits_row0"] = out.logits.detach()[0].clone()
        save_safetensors(OUT_DIR / f"{run}.safetensors", tensors)
        record = {
            "run": run,
            "folder": rel(GGUF_DIR / folder),
            "file": file,
            "precision": precision,
            "generated_by": {
                "script": "tools/golden_gguf_train.py",
                "torch": torch.__version__,
                "transformers": version("transformers"),
                "peft": version("peft"),
                "gguf": version("gguf"),
            },
            "base_model": f"webtune-test/{file.removesuffix('.gguf')}",
            "gguf_types": types,
            "stored": kinds,
            "weights_vs_source": worst,
            "lora": {"config": CONFIG, "scaling": scaling(CONFIG), "seed": seed},
            "batch": batch,
            "loss": loss,
            "modules": modules,
        }
        if folder == "gpt2":
            record["tokenized"] = [{"text": s, "ids": tok(s)["input_ids"]} for s in SENTENCES]
        write_json(OUT_DIR / f"{run}.json", record)
        print(f"{run:18} loss {loss:.6f}  weights vs source {worst if worst is None else f'{worst:.4f}'}  "
              f"{(OUT_DIR / f'{run}.safetensors').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
