"""Writes the GGUF test models packages/models/test/fixtures/gguf/ with the `gguf` Python package's
GGUFWriter, as llama.cpp's convert_hf_to_gguf.py lays them out (names blk.N.attn_q ...; Llama's
q and k rows permuted per head; GPT-2's Conv1D weights transposed to [out, in]; no output.weight
when the embedding is tied), with a mix of tensor types in every file so that each loader path
runs:

  stories/tiny-llama-q.gguf   from fixtures/tiny-llama-q:  F16, BF16, F32, Q8_0, Q4_0 (untied)
  stories/tiny-qwen2-q.gguf   from fixtures/tiny-qwen2-q:  BF16, Q4_0, Q8_0, F32 biases (tied)
  stories/tiny-qwen3-q.gguf   from fixtures/tiny-qwen3-q:  F16, Q8_0, Q4_0 (untied, q/k norms)
  stories/tiny-llama-k.gguf   a new seeded 1-layer Llama with d = 256 (k-quants need rows of
                              256): Q4_K and Q6_K as in llama.cpp's Q4_K_M files, Llama 3
                              rope_freqs, tied
  gpt2/tiny-gpt2-q.gguf       from fixtures/tiny-gpt2-q:   Q8_0, Q4_0, F16, F32; its byte-level
                              BPE tokenizer in the metadata (tokenizer.ggml.model "gpt2")

The stories/ files carry the stories260K tokenizer as tokenizer.json beside them (the loader
prefers it to the metadata); each file names its source model in general.source.repo_url (a
made-up Hub id, webtune-test/<name>) for base_model_name_or_path. Q4_K and Q6_K blocks come
from a simple encoder written here (the gguf package only decodes them; any valid block is a
valid test). Deterministic: a second run writes identical files.

Run from the repository root (after `bash tools/setup-python.sh` and tools/make_tiny_models.py):

    tools/.venv/bin/python tools/make_gguf_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import FIXTURES_DIR, REPO_ROOT, STORIES_DIR, rel  # noqa: E402

OUT = FIXTURES_DIR / "gguf"
QK_K = 256


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotary halves interleaved, per head (rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def f16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 -> Q4_K blocks [rows, cols / 256 * 144] (uint8)."""
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(blocks.min(axis=2), 0)
    hi = blocks.max(axis=2)
    step = np.maximum((hi - lo) / 15, 1e-8)
    d = np.maximum(step.max(axis=1), 1e-8) / 63
    dmin = np.maximum((-lo).max(axis=1), 1e-8) / 63
    d16 = d.astype(np.float16).astype(np.float32)
    dmin16 = dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / d16[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin16[:, None]), 0, 63).astype(np.uint8)
    q = np.clip(np.round((blocks + (dmin16[:, None] * m)[..., None]) / (d16[:, None] * sc)[..., None]), 0, 15).astype(np.uint8)
    n = blocks.shape[0]
    s = np.zeros((n, 12), dtype=np.uint8)
    for j in range(4):
        s[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        s[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        s[:, j + 8] = (sc[:, j + 4] & 15) | ((m[:, j + 4] & 15) << 4)
    qs = np.zeros((n, 128), dtype=np.uint8)
    for j in range(4):
        qs[:, 32 * j : 32 * j + 32] = q[:, 2 * j] | (q[:, 2 * j + 1] << 4)
    out = np.concatenate([f16_bits(d), f16_bits(dmin), s, qs], axis=1)
    return out.reshape(x.shape[0], -1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 -> Q6_K blocks [rows, cols / 256 * 210] (uint8)."""
    blocks = x.reshape(-1, 16, 16).astype(np.float32)
    step = np.maximum(np.abs(blocks).max(axis=2) / 31, 1e-8)
    d = np.maximum(step.max(axis=1), 1e-8) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / d16[:, None]), 1, 127).astype(np.int8)
    q = (np.clip(np.round(blocks / (d16[:, None] * sc)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    n = q.shape[0]
    ql = np.zeros((n, 128), dtype=np.uint8)
    qh = np.zeros((n, 64), dtype=np.uint8)
    for h in range(2):
        v = q[:, 128 * h : 128 * h + 128]
        q1, q2, q3, q4 = v[:, 0:32], v[:, 32:64], v[:, 64:96], v[:, 96:128]
        ql[:, 64 * h : 64 * h + 32] = (q1 & 15) | ((q3 & 15) << 4)
        ql[:, 64 * h + 32 : 64 * h + 64] = (q2 & 15) | ((q4 & 15) << 4)
        qh[:, 32 * h : 32 * h + 32] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    out = np.concatenate([ql, qh, sc.view(np.uint8), f16_bits(d)], axis=1)
    return out.reshape(x.shape[0], -1)


def add(writer, name: str, x: np.ndarray, kind: str) -> None:
    """Adds tensor `name` ([rows, cols] or [n], float32 values) in ggml type `kind`."""
    import gguf
    from gguf import GGMLQuantizationType as T

    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "F32":
        writer.add_tensor(name, x)
    elif kind == "F16":
        writer.add_tensor(name, x.astype(np.float16))
    elif kind in ("BF16", "Q8_0", "Q4_0"):
        qt = {"BF16": T.BF16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0}[kind]
        writer.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
    elif kind in ("Q4_K", "Q6_K"):
        blocks = encode_q4_k(x) if kind == "Q4_K" else encode_q6_k(x)
        qt = T.Q4_K if kind == "Q4_K" else T.Q6_K
        back = gguf.quants.dequantize(blocks, qt).reshape(x.shape)
        err = float(np.abs(back - x).max() / max(np.abs(x).max(), 1e-12))
        if err > 0.2:
            raise SystemExit(f"{name}: {kind} encoder error {err:.3f}")
        writer.add_tensor(name, blocks, raw_dtype=qt)
    else:
        raise SystemExit(f"unknown kind {kind}")


def stories_tokenizer_metadata(writer) -> None:
    """The stories260K vocabulary as SentencePiece-style metadata (what convert writes for a Llama
    tokenizer); the loader uses the tokenizer.json beside the file, this only has to be there."""
    tok = json.loads((STORIES_DIR / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([3 if i in special else (6 if t.startswith("<0x") else 1) for i, t in enumerate(tokens)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def gpt2_tokenizer_metadata(writer, folder: Path) -> None:
    """A byte-level BPE tokenizer (tokenizer.ggml.model "gpt2") from the fixture's tokenizer.json."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


def llama_family(name: str, folder: Path | None, sd: dict, cfg: dict, kinds: dict[str, str], out: Path) -> None:
    import gguf

    arch = cfg["model_type"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_source_repo_url(f"https://huggingface.co/webtune-test/{name}")
    d = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or d // heads
    L = cfg["num_hidden_layers"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(d)
    writer.add_block_count(L)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_file_type(1)
    stories_tokenizer_metadata(writer)

    def kind(key: str, default: str) -> str:
        for pattern, k in kinds.items():
            if pattern in key:
                return k
        return default

    add(writer, "token_embd.weight", sd["model.embed_tokens.weight"], kind("embed_tokens", "F16"))
    add(writer, "output_norm.weight", sd["model.norm.weight"], "F32")
    if not cfg["tie_word_embeddings"]:
        add(writer, "output.weight", sd["lm_head.weight"], kind("lm_head", "Q8_0"))
    if "rope_freqs" in sd:
        add(writer, "rope_freqs.weight", sd["rope_freqs"], "F32")
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(L):
        for hf, gg in names.items():
            key = f"model.layers.{i}.{hf}"
            if key not in sd:
                continue
            x = sd[key]
            if arch == "llama" and hf.startswith("self_attn.q_proj"):
                x = permute(x, heads)
            if arch == "llama" and hf.startswith("self_attn.k_proj"):
                x = permute(x, kv)
            default = "F32" if x.ndim == 1 else "F16"
            add(writer, f"blk.{i}.{gg}", x, "F32" if x.ndim == 1 else kind(f"{i}.{hf}", default))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gpt2(name: str, sd: dict, cfg: dict, kinds: dict[str, str], out: Path, folder: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name(name)
    writer.add_source_repo_url(f"https://huggingface.co/webtune-test/{name}")
    d = cfg["n_embd"]
    writer.add_block_count(cfg["n_layer"])
    writer.add_context_length(cfg["n_positions"])
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(cfg.get("n_inner") or 4 * d)
    writer.add_head_count(cfg["n_head"])
    writer.add_layer_norm_eps(float(cfg["layer_norm_epsilon"]))
    writer.add_file_type(1)
    gpt2_tokenizer_metadata(writer, folder)
    add(writer, "token_embd.weight", sd["transformer.wte.weight"], "F16")
    add(writer, "position_embd.weight", sd["transformer.wpe.weight"], "F32")
    add(writer, "output_norm.weight", sd["transformer.ln_f.weight"], "F32")
    add(writer, "output_norm.bias", sd["transformer.ln_f.bias"], "F32")
    names = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(cfg["n_layer"]):
        for hf, gg in names.items():
            for part in ("weight", "bias"):
                x = sd[f"transformer.h.{i}.{hf}.{part}"]
                if x.ndim == 2:
                    x = x.T  # Conv1D [in, out] -> [out, in], as convert_hf_to_gguf does
                add(writer, f"blk.{i}.{gg}.{part}", x, "F32" if x.ndim == 1 else kinds.get(f"{i}.{hf}", "F16"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_sd(folder: Path) -> tuple[dict, dict]:
    import torch
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float32).numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    return sd, json.loads((folder / "config.json").read_text())


def k_model() -> tuple[dict, dict]:
    """A seeded 1-layer Llama, d = 256, tied, with Llama 3 RoPE factors (rope_freqs)."""
    rng = np.random.default_rng(4242)
    d, heads, kv, hd, inter, vocab = 256, 4, 2, 64, 256, 512
    cfg = {
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 20000.0,
        "tie_word_embeddings": True,
    }
    n = lambda *s, g=1.0: (rng.standard_normal(s) * g).astype(np.float32)  # noqa: E731
    sd = {
        "model.embed_tokens.weight": n(vocab, d, g=2 / 16),
        "model.norm.weight": (0.6 + 0.8 * rng.random(d)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": (0.6 + 0.8 * rng.random(d)).astype(np.float32),
        "model.layers.0.post_attention_layernorm.weight": (0.6 + 0.8 * rng.random(d)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": n(heads * hd, d, g=2 / 16),
        "model.layers.0.self_attn.k_proj.weight": n(kv * hd, d, g=2 / 16),
        "model.layers.0.self_attn.v_proj.weight": n(kv * hd, d, g=1 / 16),
        "model.layers.0.self_attn.o_proj.weight": n(d, heads * hd, g=3 / 16),
        "model.layers.0.mlp.gate_proj.weight": n(inter, d, g=1 / 16),
        "model.layers.0.mlp.up_proj.weight": n(inter, d, g=1 / 16),
        "model.layers.0.mlp.down_proj.weight": n(d, inter, g=3 / 16),
        # Llama 3's smoothed band: divisors 1 (high frequencies) to 8 (low).
        "rope_freqs": np.linspace(1.0, 8.0, hd // 2).astype(np.float32),
    }
    return sd, cfg


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "stories").mkdir(parents=True)
    (OUT / "gpt2").mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(STORIES_DIR / f, OUT / "stories" / f)
    sd, cfg = load_sd(FIXTURES_DIR / "tiny-llama-q")
    llama_family(
        "tiny-llama-q",
        None,
        sd,
        cfg,
        {"embed_tokens": "F16", "lm_head": "Q8_0", "0.self_attn.q_proj": "Q8_0", "0.self_attn.k_proj": "Q4_0",
         "0.self_attn.v_proj": "BF16", "0.self_attn.o_proj": "Q8_0", "0.mlp.gate_proj": "Q4_0", "0.mlp.up_proj": "F32",
         "0.mlp.down_proj": "Q8_0", "1.self_attn.q_proj": "Q4_0", "1.self_attn.k_proj": "Q8_0", "1.self_attn.v_proj": "Q4_0",
         "1.self_attn.o_proj": "Q4_0", "1.mlp": "Q4_0"},
        OUT / "stories/tiny-llama-q.gguf",
    )
    sd, cfg = load_sd(FIXTURES_DIR / "tiny-qwen2-q")
    llama_family(
        "tiny-qwen2-q", None, sd, cfg,
        {"embed_tokens": "BF16", "self_attn.q_proj": "Q4_0", "self_attn.k_proj": "Q4_0", "self_attn.v_proj": "Q8_0",
         "self_attn.o_proj": "Q4_0", "mlp.gate_proj": "Q4_0", "mlp.up_proj": "Q4_0", "mlp.down_proj": "BF16"},
        OUT / "stories/tiny-qwen2-q.gguf",
    )
    sd, cfg = load_sd(FIXTURES_DIR / "tiny-qwen3-q")
    llama_family(
        "tiny-qwen3-q", None, sd, cfg,
        {"embed_tokens": "F16", "lm_head": "Q4_0", "self_attn.q_proj": "Q8_0", "self_attn.k_proj": "F16",
         "self_attn.v_proj": "Q8_0", "self_attn.o_proj": "Q8_0", "mlp": "Q8_0"},
        OUT / "stories/tiny-qwen3-q.gguf",
    )
    sd, cfg = k_model()
    llama_family(
        "tiny-llama-k", None, sd, cfg,
        {"embed_tokens": "Q6_K", "self_attn.q_proj": "Q4_K", "self_attn.k_proj": "Q4_K", "self_attn.v_proj": "Q6_K",
         "self_attn.o_proj": "Q4_K", "mlp.gate_proj": "Q4_K", "mlp.up_proj": "Q4_K", "mlp.down_proj": "Q6_K"},
        OUT / "stories/tiny-llama-k.gguf",
    )
    sd, cfg = load_sd(FIXTURES_DIR / "tiny-gpt2-q")
    gpt2(
        "tiny-gpt2-q", sd, cfg,
        {"0.attn.c_attn": "Q8_0", "0.attn.c_proj": "Q4_0", "0.mlp.c_fc": "F16", "0.mlp.c_proj": "Q8_0",
         "1.attn.c_attn": "Q4_0", "1.attn.c_proj": "Q8_0", "1.mlp.c_fc": "Q4_0", "1.mlp.c_proj": "Q4_0"},
        OUT / "gpt2/tiny-gpt2-q.gguf",
        FIXTURES_DIR / "tiny-gpt2-q",
    )
    (OUT / "README.md").write_text(
        "# GGUF test models\n\n"
        "Written by tools/make_gguf_fixtures.py from the tiny-*-q fixtures (and a seeded d = 256 Llama for\n"
        "the k-quants) with the `gguf` package's GGUFWriter, laid out as llama.cpp's converter lays them\n"
        "out, with a mix of F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K tensors. `stories/` holds the\n"
        "stories260K tokenizer.json beside its files; `gpt2/` keeps its tokenizer in the GGUF metadata.\n"
        "Golden outputs: packages/train/test/golden/gguf-train/ (tools/golden_gguf_train.py).\n",
        encoding="utf-8",
    )
    for p in sorted(OUT.rglob("*.gguf")):
        print(f"{rel(p)}: {p.stat().st_size:,} bytes")
    _ = REPO_ROOT


if __name__ == "__main__":
    main()
