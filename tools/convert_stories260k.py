"""Converts llama2.c's stories260K (tools/data/stories260K/{stories260K.bin,tok512.bin}) into the
Hugging Face folder apps/studio/public/models/stories260K/, the studio's embedded default model.

Run from the repository root (after `bash tools/setup-python.sh`):

    tools/.venv/bin/python tools/convert_stories260k.py

Writes config.json, generation_config.json, model.safetensors (F32), tokenizer.json,
tokenizer_config.json, README.md and LICENSE, then checks, and prints:
  1. the HF model's logits equal a float64 NumPy re-implementation of llama2.c's forward (run.c,
     interleaved RoPE) on the original weights, which proves the q/k permutation;
  2. greedy generation from [BOS] for 60 new tokens starts "Once upon a time, there was a little
     girl named Lily";
  3. a re-implementation of run.c's `encode` on tok512.bin gives the same ids as tokenizer.json
     through transformers' PreTrainedTokenizerFast on thousands of random strings and on text;
  4. the folder loads in transformers without any warning.
Exits non-zero if a check fails. Deterministic: running it twice writes identical files.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import REPO_ROOT, STORIES_DIR, load_checked, rel, save_safetensors, write_json  # noqa: E402

SRC = REPO_ROOT / "tools/data/stories260K"
SHA256 = {
    "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
}
EXPECTED_START = "Once upon a time, there was a little girl named Lily"
SPIECE_SPACE = "\u2581"  # SentencePiece's "▁"
N_RANDOM_STRINGS = 3000


# ---------------------------------------------------------------------------------------------
# llama2.c files


def read_checkpoint(path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """llama2.c legacy format: 7 int32 header, then float32 tensors (fixtures README)."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    shared_classifier = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    shapes = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head // 2)),
        ("freq_cis_imag", (seq_len, head // 2)),
    ]
    if not shared_classifier:
        shapes.append(("wcls", (vocab, dim)))
    floats = np.frombuffer(raw, dtype="<f4", offset=7 * 4)
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        weights[name] = floats[offset : offset + n].reshape(shape).copy()
        offset += n
    if offset != floats.size:
        raise ValueError(f"{path}: {floats.size - offset} float32 values left after the last tensor")
    cfg = dict(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=vocab, seq_len=seq_len, shared_classifier=int(shared_classifier),
    )
    return cfg, weights


def read_tokenizer(path: Path, vocab_size: int) -> list[tuple[bytes, float]]:
    """llama2.c tokenizer.bin: int32 max_token_length, then (float32 score, int32 len, bytes)."""
    raw = path.read_bytes()
    offset = 4
    pieces: list[tuple[bytes, float]] = []
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", raw, offset)
        offset += 8
        pieces.append((raw[offset : offset + n], float(score)))
        offset += n
    if offset != len(raw):
        raise ValueError(f"{path}: {len(raw) - offset} bytes left after {vocab_size} tokens")
    return pieces


# ---------------------------------------------------------------------------------------------
# Reference: llama2.c's forward (run.c) and encoder, re-implemented in NumPy/Python


def llama2c_logits(cfg: dict[str, int], w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """float64 logits (T, vocab) of run.c's `forward` run position by position, on the original
    (un-permuted) weights: RMSNorm eps 1e-5, interleaved RoPE pairs (2i, 2i+1) with frequency
    10000^(-(i mod head_size)/head_size), GQA, SwiGLU, classifier shared with the embedding."""
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs = dim // n_heads
    kv_mul = n_heads // n_kv
    L = cfg["n_layers"]
    f = {k: v.astype(np.float64) for k, v in w.items()}

    def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))

    def rope(vec: np.ndarray, pos: int) -> np.ndarray:
        out = vec.copy()
        for i in range(0, vec.size, 2):
            freq = 1.0 / 10000.0 ** ((i % hs) / hs)
            c, s = np.cos(pos * freq), np.sin(pos * freq)
            out[i] = vec[i] * c - vec[i + 1] * s
            out[i + 1] = vec[i] * s + vec[i + 1] * c
        return out

    keys = [[] for _ in range(L)]
    values = [[] for _ in range(L)]
    logits = []
    for pos, tok in enumerate(tokens):
        x = f["token_embedding"][tok].copy()
        for layer in range(L):
            xb = rmsnorm(x, f["rms_att"][layer])
            q = rope(f["wq"][layer] @ xb, pos)
            keys[layer].append(rope(f["wk"][layer] @ xb, pos))
            values[layer].append(f["wv"][layer] @ xb)
            att_out = np.zeros(dim)
            for h in range(n_heads):
                kvh = h // kv_mul
                qh = q[h * hs : (h + 1) * hs]
                k = np.stack([kk[kvh * hs : (kvh + 1) * hs] for kk in keys[layer]])
                v = np.stack([vv[kvh * hs : (kvh + 1) * hs] for vv in values[layer]])
                scores = k @ qh / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hs : (h + 1) * hs] = p @ v
            x = x + f["wo"][layer] @ att_out
            xb = rmsnorm(x, f["rms_ffn"][layer])
            h1 = f["w1"][layer] @ xb
            h3 = f["w3"][layer] @ xb
            x = x + f["w2"][layer] @ ((h1 / (1.0 + np.exp(-h1))) * h3)
        x = rmsnorm(x, f["rms_final"])
        logits.append(f["token_embedding"] @ x)
    return np.stack(logits)


def llama2c_encode(pieces: list[tuple[bytes, float]], text: str, bos: bool = True) -> list[int]:
    """run.c `encode`: a dummy-prefix " " token when the text is not empty, one token per UTF-8
    code point (or its bytes + 3 when the code point is not a piece), then repeatedly merge the
    adjacent pair whose concatenation is a piece with the highest score (leftmost on ties)."""
    lookup = {p: i for i, (p, _) in enumerate(pieces)}
    data = text.encode("utf-8")
    tokens: list[int] = [1] if bos else []
    if data:
        tokens.append(lookup[b" "])
    i = 0
    while i < len(data):
        # a code point: a lead byte and at most 3 continuation bytes
        j = i + 1
        while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        cp = data[i:j]
        if cp in lookup:
            tokens.append(lookup[cp])
        else:
            tokens.extend(b + 3 for b in cp)
        i = j
    start = 1 if bos else 0
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for k in range(start, len(tokens) - 1):
            merged = lookup.get(pieces[tokens[k]][0] + pieces[tokens[k + 1]][0], -1)
            if merged != -1 and pieces[merged][1] > best_score:
                best_score, best_id, best_idx = pieces[merged][1], merged, k
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


# ---------------------------------------------------------------------------------------------
# Writers


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k from llama2.c's interleaved pairs (0,1),(2,3).. to HF's halves (i, i+hd/2):
    view (heads, hd/2, 2, in), swap the middle axes, reshape back."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_config(cfg: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["dim"],
        "intermediate_size": cfg["hidden_dim"],
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg["n_kv_heads"],
        "head_dim": cfg["dim"] // cfg["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": cfg["seq_len"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }


def hf_state_dict(cfg: dict[str, int], w: dict[str, np.ndarray]) -> dict:
    import torch

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    sd = {"model.embed_tokens.weight": t(w["token_embedding"])}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = t(permute_rope(w["wq"][i], cfg["n_heads"]))
        sd[p + "self_attn.k_proj.weight"] = t(permute_rope(w["wk"][i], cfg["n_kv_heads"]))
        sd[p + "self_attn.v_proj.weight"] = t(w["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = t(w["wo"][i])
        sd[p + "mlp.gate_proj.weight"] = t(w["w1"][i])
        sd[p + "mlp.up_proj.weight"] = t(w["w3"][i])
        sd[p + "mlp.down_proj.weight"] = t(w["w2"][i])
        sd[p + "input_layernorm.weight"] = t(w["rms_att"][i])
        sd[p + "post_attention_layernorm.weight"] = t(w["rms_ffn"][i])
    sd["model.norm.weight"] = t(w["rms_final"])
    # Tied embeddings: no lm_head.weight, as save_pretrained writes for tie_word_embeddings.
    return sd


def piece_text(p: bytes) -> str:
    return p.decode("utf-8").replace(" ", SPIECE_SPACE)


def build_tokenizer(pieces: list[tuple[bytes, float]]):
    """tokenizer.json equivalent to run.c's encoder (fixtures README): BPE with byte fallback,
    merges = every split a+b (both pieces) of each multi-character piece, ranked by the merged
    piece's score, highest first; normalizer Prepend("▁") + Replace(" ", "▁"); no
    pre-tokenizer; decoder Replace("▁", " "), ByteFallback, Fuse, Strip one leading space;
    post-processor "<s> $A"."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab: dict[str, int] = {}
    for i, (p, _) in enumerate(pieces):
        text = specials.get(i, piece_text(p))
        if text in vocab:
            raise ValueError(f"duplicate piece {text!r} at ids {vocab[text]} and {i}")
        vocab[text] = i
    for b in range(256):
        if vocab.get(f"<0x{b:02X}>") != b + 3:
            raise ValueError(f"byte piece <0x{b:02X}> is not at id {b + 3}")
    ranked = []
    for i, (p, score) in enumerate(pieces):
        if i < 3 + 256:
            continue
        text = piece_text(p)
        for k in range(1, len(text)):
            a, b = text[:k], text[k:]
            if a in vocab and b in vocab:
                ranked.append((-score, vocab[a], vocab[b], a, b))
    ranked.sort()
    merges = [(a, b) for _, _, _, a, b in ranked]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in range(3)])
    # Exactly the template transformers' update_post_processor writes for add_bos_token=True,
    # add_eos_token=False, so tokenizer.json and tokenizer_config.json agree.
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok, len(merges)


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "added_tokens_decoder": {
            str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i, c in enumerate(["<unk>", "<s>", "</s>"])
        },
    }


def write_folder(out: Path, cfg: dict[str, int], w: dict[str, np.ndarray], pieces) -> int:
    import json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", hf_config(cfg))
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    save_safetensors(out / "model.safetensors", hf_state_dict(cfg, w))
    tok, n_merges = build_tokenizer(pieces)
    write_json(out / "tokenizer.json", json.loads(tok.to_str()))
    write_json(out / "tokenizer_config.json", tokenizer_config(cfg["seq_len"]))
    shutil.copyfile(SRC / "LICENSE", out / "LICENSE")
    (out / "README.md").write_text(
        "# stories260K (Hugging Face layout)\n\n"
        "Andrej Karpathy's llama2.c \"tinyllamas\" stories260K model (MIT licence, see LICENSE), a\n"
        "260K-parameter Llama trained on TinyStories, converted by `tools/convert_stories260k.py` from\n"
        "`tools/data/stories260K/stories260K.bin` (sha256 " + SHA256["stories260K.bin"] + ")\n"
        "and `tok512.bin` (sha256 " + SHA256["tok512.bin"] + ").\n\n"
        "q_proj/k_proj rows are permuted from llama2.c's interleaved RoPE to the half rotation of\n"
        "transformers' Llama. tokenizer.json reproduces llama2.c's encoder (BPE, byte fallback, merges\n"
        "ranked by the merged piece's score, `<s>` added in front). Greedy generation from `<s>`\n"
        "starts \"" + EXPECTED_START + "\".\n",
        encoding="utf-8",
    )
    return n_merges


# ---------------------------------------------------------------------------------------------
# Checks


def random_strings(n: int, seed: int) -> list[str]:
    """Unicode, whitespace runs, leading spaces, newlines, and story words that exercise merges.
    Leaves out NUL (run.c reads C strings), "▁" (SentencePiece treats it as a space while run.c
    byte-encodes it) and the special-token texts (matched as added tokens by tokenizers)."""
    rng = random.Random(seed)
    words = ["Once", "upon", "a", "time", "there", "was", "little", "girl", "named", "Lily", "the", "The",
             "and", "to", "he", "she", "said", "happy", "played", "with", "ball", "park", "mom", "It", "day"]
    alphabets = [
        "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
        ".,!?;:'\"-()[]{}<>/\\|@#$%^&*_+=~`", " ", "  \t\n\r",
        "éèêñüöäßçøåÉÑ", "“”‘’–—…€™\u00a0\u200a", "日本語中文한국어", "😀🎉👍🏽❤️", "ΑΒΓαβγЖжЯя", "\x01\x07\x1f\x7f",
    ]
    out: list[str] = []
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(words))
            elif r < 0.5:
                parts.append(" " * rng.randint(1, 4))
            elif r < 0.55:
                parts.append("\n" * rng.randint(1, 3))
            else:
                a = rng.choice(alphabets)
                parts.append("".join(rng.choice(a) for _ in range(rng.randint(1, 5))))
        s = "".join(parts)
        if rng.random() < 0.2:
            s = " " * rng.randint(1, 3) + s
        if any(bad in s for bad in ("\x00", SPIECE_SPACE, "<s>", "</s>", "<unk>")):
            continue
        out.append(s)
    return out


def check_tokenizer(pieces, tok) -> int:
    texts = ["", " ", "  ", "\n", "Hello world", " leading", "a  b   c\n\nd", EXPECTED_START + "."]
    texts += random_strings(N_RANDOM_STRINGS, seed=260)
    shakespeare = REPO_ROOT / "packages/models/test/fixtures/text/shakespeare-4k.txt"
    if shakespeare.exists():
        texts.append(shakespeare.read_text(encoding="utf-8"))
    bad = 0
    for s in texts:
        ref = llama2c_encode(pieces, s)
        got = tok(s)["input_ids"]
        if ref != got:
            bad += 1
            if bad <= 5:
                print(f"  MISMATCH {s!r}\n    run.c: {ref}\n    hf:    {got}")
    if bad:
        raise SystemExit(f"tokenizer: {bad} of {len(texts)} strings differ from run.c's encoder")
    return len(texts)


def greedy(model, ids: list[int], n_new: int) -> list[int]:
    """Argmax decoding for exactly n_new tokens, recomputing the whole prefix each step."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
    return out[len(ids) :]


def main() -> None:
    import torch

    for name, digest in SHA256.items():
        got = hashlib.sha256((SRC / name).read_bytes()).hexdigest()
        if got != digest:
            raise SystemExit(f"{rel(SRC / name)}: sha256 {got}, expected {digest}")
    cfg, w = read_checkpoint(SRC / "stories260K.bin")
    pieces = read_tokenizer(SRC / "tok512.bin", cfg["vocab_size"])
    print(f"llama2.c header: {cfg}")
    n_merges = write_folder(STORIES_DIR, cfg, w, pieces)
    print(f"wrote {rel(STORIES_DIR)}/: " + ", ".join(
        f"{p.name} ({p.stat().st_size:,} B)" for p in sorted(STORIES_DIR.iterdir())))
    print(f"tokenizer.json: {len(pieces)} pieces, {n_merges} merges")

    model, tok = load_checked(STORIES_DIR)
    print("loads without warnings: AutoModelForCausalLM.from_pretrained, PreTrainedTokenizerFast(tokenizer_file=...)")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")

    new = greedy(model, [1], 60)
    text = tok.decode([1] + new, skip_special_tokens=True)
    with torch.no_grad():
        gen = model.generate(torch.tensor([[1]]), max_new_tokens=60, do_sample=False)[0, 1:].tolist()
    if gen != new[: len(gen)]:
        raise SystemExit(f"model.generate {gen} differs from the argmax loop {new}")
    print(f"greedy from [BOS], 60 new tokens: {text!r}")
    if not text.startswith(EXPECTED_START):
        raise SystemExit(f"generation does not start with {EXPECTED_START!r}")

    seq = [1] + new[:31]
    ref = llama2c_logits(cfg, w, seq)
    with torch.no_grad():
        got = model(torch.tensor([seq])).logits[0].double().numpy()
    err = float(np.abs(ref - got).max())
    print(f"HF logits vs NumPy llama2.c forward on {len(seq)} tokens: max |diff| {err:.2e}")
    if err > 1e-4:
        raise SystemExit("logits differ from the llama2.c forward: conversion is wrong")

    n = check_tokenizer(pieces, tok)
    print(f"tokenizer.json == run.c encode on {n} strings")


if __name__ == "__main__":
    main()
