"""Golden data for RoPE (packages/core/test/golden/rope.json), from Hugging Face transformers.

For each configuration: the inverse frequencies and attention scaling that LlamaRotaryEmbedding
computes (transformers' default and llama3 rope parameters), and one application of
apply_rotary_pos_emb to a small q and k at positions pos0 .. pos0+T-1, laid out as webtune keeps
them: [rows = B*T, nHeads*headDim] row-major.

Run: tools/.venv/bin/python tools/golden_rope.py (after bash tools/setup-python.sh)
"""

import json
import pathlib

import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

OUT = pathlib.Path(__file__).resolve().parent.parent / "packages/core/test/golden/rope.json"

CONFIGS = [
    # stories260K (dim 64, 8 heads)
    {"name": "default hd8 theta1e4", "headDim": 8, "ropeTheta": 10000.0, "ropeScaling": None},
    {"name": "default hd12 theta1e4", "headDim": 12, "ropeTheta": 10000.0, "ropeScaling": {"rope_type": "default"}},
    # Qwen3
    {"name": "default hd128 theta1e6", "headDim": 128, "ropeTheta": 1000000.0, "ropeScaling": None},
    # Llama 3.2 1B/3B
    {
        "name": "llama3 hd64 factor32",
        "headDim": 64,
        "ropeTheta": 500000.0,
        "ropeScaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # Llama 3.1 8B
    {
        "name": "llama3 hd128 factor8",
        "headDim": 128,
        "ropeTheta": 500000.0,
        "ropeScaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # small head with all three llama3 bands (high, smoothed, low frequency)
    {
        "name": "llama3 hd12 small context",
        "headDim": 12,
        "ropeTheta": 10000.0,
        "ropeScaling": {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
]

# (config index, B, T, nHeads, pos0)
APPLICATIONS = [(1, 2, 3, 2, 5), (5, 1, 4, 3, 1000), (3, 1, 2, 1, 70000)]


def rotary(cfg):
    n_heads = 4
    rope_parameters = {"rope_type": "default", "rope_theta": cfg["ropeTheta"]}
    if cfg["ropeScaling"] is not None:
        rope_parameters.update(cfg["ropeScaling"])
    config = LlamaConfig(
        hidden_size=cfg["headDim"] * n_heads,
        num_attention_heads=n_heads,
        head_dim=cfg["headDim"],
        max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )
    return LlamaRotaryEmbedding(config)


def f32_list(t):
    return [float(v) for v in t.to(torch.float32).flatten().tolist()]


def main():
    torch.manual_seed(0)
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "configs": [], "applications": []}
    modules = []
    for cfg in CONFIGS:
        emb = rotary(cfg)
        modules.append(emb)
        out["configs"].append(
            {**cfg, "invFreq": f32_list(emb.inv_freq), "attentionScaling": float(emb.attention_scaling)}
        )
    for ci, B, T, n_heads, pos0 in APPLICATIONS:
        cfg = CONFIGS[ci]
        hd = cfg["headDim"]
        emb = modules[ci]
        q = torch.randn(B, n_heads, T, hd, dtype=torch.float32)  # (B, nH, T, hd) as HF attention holds it
        k = torch.randn(B, n_heads, T, hd, dtype=torch.float32)
        position_ids = torch.arange(pos0, pos0 + T).unsqueeze(0).expand(B, T)
        cos, sin = emb(q, position_ids)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)

        def rows(t):  # (B, nH, T, hd) -> (B*T, nH*hd)
            return f32_list(t.transpose(1, 2).reshape(B * T, n_heads * hd))

        out["applications"].append(
            {
                "config": ci,
                "B": B,
                "T": T,
                "nHeads": n_heads,
                "pos0": pos0,
                "q": rows(q),
                "k": rows(k),
                "qRot": rows(q_rot),
                "kRot": rows(k_rot),
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
