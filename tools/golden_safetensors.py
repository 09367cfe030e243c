"""Reference safetensors files written by Python's safetensors (and PEFT / transformers), for
packages/models/test/safetensors*.test.ts and weights*.test.ts.

    tools/.venv/bin/python tools/golden_safetensors.py

Writes into packages/models/test/fixtures/safetensors/:
  mixed.safetensors     F32, BF16 and F16 tensors whose values follow `formula` below (the
                        TypeScript test computes the same values and must write the same bytes),
                        names chosen so that the dtype ordering, byte-wise name ordering, a
                        non-ASCII name, a scalar and an empty tensor all matter; metadata
                        {"format": "pt"}
  plain.safetensors     two F16 tensors, no metadata at all
  empty.safetensors     no tensors
  specials.safetensors  the values of conversions.json as F32, F16 and BF16 tensors
  adapter/              adapter_model.safetensors + adapter_config.json as PEFT's
                        save_pretrained writes them for a tiny random Llama (values random: the
                        test reads them back and must write the same bytes)
  sharded/              a tiny random Llama saved by transformers' save_pretrained with a small
                        max_shard_size: model.safetensors.index.json + shards
  conversions.json      f32 inputs (as uint32 bits) and PyTorch's conversions of them to f16 and
                        bf16, and of those halves / bfloats on to f16 and f32 (all as bits)
"""

import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages", "models", "test", "fixtures", "safetensors")


def formula(count: int, seed: int) -> np.ndarray:
    """((i*7919 + seed*104729) mod 2003 - 1001) / 97.3 in float64, rounded to float32. Exact in
    both languages: integer arithmetic, one IEEE division, one rounding to f32."""
    i = np.arange(count, dtype=np.int64)
    v = ((i * 7919 + seed * 104729) % 2003 - 1001).astype(np.float64) / 97.3
    return v.astype(np.float32)


def tensor(shape, seed, dtype):
    n = int(np.prod(shape)) if len(shape) else 1
    return torch.from_numpy(formula(n, seed)).reshape(shape).to(dtype)


def bits(t: torch.Tensor) -> list:
    if t.dtype == torch.float32:
        return [int(x) for x in t.contiguous().view(torch.int32).numpy().view(np.uint32)]
    return [int(x) for x in t.contiguous().view(torch.int16).numpy().view(np.uint16)]


def special_inputs() -> np.ndarray:
    """f32 values that exercise rounding to f16 and bf16: ties, subnormals, overflow, zeros,
    plus random bit patterns over the whole range and random values of ordinary size."""
    f = [0.0, -0.0, 1.0, -2.0, 65504.0, 65519.0, 65520.0, -65520.0, 1e-8, 2**-24, 2**-25, 3 * 2**-25,
         2**-14, 2**-15 + 2**-25, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, 1 + 2**-8, 1 + 3 * 2**-8,
         3.0e38, 3.4028234663852886e38, float("inf"), float("-inf"), 1 / 3, -1 / 3, 0.1]
    rng = np.random.default_rng(20240607)
    random_bits = rng.integers(0, 2**32, size=400, dtype=np.uint64).astype(np.uint32)
    random_bits = random_bits[(random_bits & 0x7F800000) != 0x7F800000]  # no NaN / inf patterns
    # Exact f16 ties: the 13 bits below a half's mantissa are 0x1000.
    f16_ties = (rng.integers(0x33000000, 0x47800000, size=100, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0x1FFF)) | np.uint32(0x1000)
    # Exact bf16 ties: the low 16 bits are 0x8000.
    bf16_ties = (rng.integers(0, 0x7F000000, size=100, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0xFFFF)) | np.uint32(0x8000)
    ordinary = rng.standard_normal(300).astype(np.float32) * np.float32(3)
    return np.concatenate([
        np.array(f, dtype=np.float32),
        random_bits.view(np.float32),
        f16_ties.view(np.float32),
        bf16_ties.view(np.float32),
        ordinary,
    ])


def write_conversions():
    x = torch.from_numpy(special_inputs())
    f16 = x.to(torch.float16)
    bf16 = x.to(torch.bfloat16)
    # Every half pattern but NaNs (NaN payloads are implementation-defined), as a sample: 1 in 61.
    halves = np.arange(0, 65536, 61, dtype=np.uint32).astype(np.uint16)
    halves = halves[((halves & 0x7C00) != 0x7C00) | ((halves & 0x3FF) == 0)]
    h = torch.from_numpy(halves.view(np.float16).copy())
    data = {
        "f32_bits": bits(x),
        "f32_to_f16_bits": bits(f16),
        "f32_to_bf16_bits": bits(bf16),
        "bf16_to_f16_bits": bits(bf16.to(torch.float16)),
        "bf16_to_f32_bits": bits(bf16.to(torch.float32)),
        "f16_bits": bits(h),
        "f16_to_f32_bits": bits(h.to(torch.float32)),
    }
    with open(os.path.join(OUT, "conversions.json"), "w") as fh:
        json.dump(data, fh, separators=(",", ":"))
        fh.write("\n")
    save_file({"x_f32": x, "x_f16": f16, "x_bf16": bf16}, os.path.join(OUT, "specials.safetensors"), metadata={"format": "pt"})


def write_mixed():
    tensors = {
        # F32 is written before BF16 and F16 whatever the names say.
        "zeta.weight": tensor([3, 5], 1, torch.float32),
        "alpha.bias": tensor([7], 2, torch.float32),
        "Beta": tensor([2, 3, 4], 3, torch.bfloat16),
        "a_bf16": tensor([5], 4, torch.bfloat16),
        "a_f16": tensor([9], 5, torch.float16),
        "model.layers.10.w": tensor([4, 1], 6, torch.float16),
        "model.layers.9.w": tensor([1, 4], 7, torch.float16),
        "scalar": tensor([], 8, torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
        "\u00e9l\u00e8ve": tensor([2], 9, torch.float32),
        "\uff21wide": tensor([1], 10, torch.float32),
        "\U0001f600emoji": tensor([1], 11, torch.float32),
    }
    save_file(tensors, os.path.join(OUT, "mixed.safetensors"), metadata={"format": "pt"})
    save_file({"b": tensor([3], 12, torch.float16), "a": tensor([2, 2], 13, torch.float16)}, os.path.join(OUT, "plain.safetensors"))
    save_file({}, os.path.join(OUT, "empty.safetensors"))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def write_adapter():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    # Give B non-zero values so the file holds more than zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    path = os.path.join(OUT, "adapter")
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    readme = os.path.join(path, "README.md")  # a model card template, not part of the format
    if os.path.exists(readme):
        os.remove(readme)


def write_sharded():
    model = tiny_llama().to(torch.bfloat16)
    path = os.path.join(OUT, "sharded")
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, max_shard_size="3KB")
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(path, extra)):
            os.remove(os.path.join(path, extra))


def main():
    os.makedirs(OUT, exist_ok=True)
    write_mixed()
    write_conversions()
    write_adapter()
    write_sharded()
    for root, _, files in sorted(os.walk(OUT)):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"{os.path.relpath(p, OUT)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
