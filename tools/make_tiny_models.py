"""Writes the tiny random test models packages/models/test/fixtures/tiny-*/ (complete Hugging Face
folders: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json, README.md) and the text fixture packages/models/test/fixtures/text/.

Run from the repository root (after `bash tools/setup-python.sh`, and after
tools/convert_stories260k.py, whose tokenizer the Llama/Qwen fixtures reuse):

    tools/.venv/bin/python tools/make_tiny_models.py

The sizes are awkward on purpose (head_dim 12/14/16, GQA and MQA, odd intermediate sizes, n_embd
not a multiple of 8), except in the tiny-*-q fixtures for the quantized base (see QUANT_MODELS) and the weights are seeded random values scaled so that logits have a
standard deviation of about 2 (not flat). Every folder is checked to load in transformers without
warnings and to hold exactly the weights written. Deterministic: a second run writes identical
files.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import (  # noqa: E402
    FIXTURES_DIR,
    SHAKESPEARE_4K,
    STORIES_DIR,
    collect_warnings,
    load_checked,
    rel,
    save_safetensors,
    tokenizer_from_file,
    write_json,
)

SHAKESPEARE_SRC = Path("/work/shared/fixtures/text/tinyshakespeare.txt")
SHAKESPEARE_SRC_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
GPT2_VOCAB = 384
LOGIT_STD_TARGET = 2.0
# Gains that keep greedy generation from collapsing into one repeated token (a generation test
# would then check little). Projections that write into the residual stream get RESIDUAL_GAIN, so
# the stream is not dominated by the token's own embedding (with tied embeddings that makes the
# model predict its input token); queries and keys get QK_GAIN (q/k_norm weights for Qwen3, the
# q and k columns of GPT-2's c_attn), so attention is selective and the context matters. With
# 3 and 2 the golden generations use 12-20 distinct tokens out of 20.
RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "attn.c_proj.weight", "mlp.c_proj.weight")
RESIDUAL_GAIN = 3.0
QK = ("q_proj.weight", "k_proj.weight")
QK_GAIN = 2.0

# The configs, written as the Hugging Face hub writes them (torch_dtype, rope_theta and
# rope_scaling at the top level), each with the seed of its weights and the dtype they are stored in.
MODELS: dict[str, dict] = {
    "tiny-llama": {
        "seed": 1001,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "torch_dtype": "float32",
            "vocab_size": 512,
            "hidden_size": 48,
            "intermediate_size": 37,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 12,
            "hidden_act": "silu",
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-06,
            "rope_theta": 50000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": None,
        },
    },
    # As Llama 3.2 1B: llama3 RoPE scaling and tied embeddings. original_max_position_embeddings
    # 32 with head_dim 16 and theta 20000 puts the frequencies in all three bands (wavelength
    # < 8 kept, 8..32 smoothed, > 32 divided by factor), so the scaling shows within 25 positions.
    "tiny-llama3": {
        "seed": 1002,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "torch_dtype": "float32",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 40,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-05,
            "rope_theta": 20000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": None,
        },
    },
    # As Qwen2.5 0.5B: q/k/v bias, tied embeddings, weights stored as BF16.
    "tiny-qwen2": {
        "seed": 1003,
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "torch_dtype": "bfloat16",
            "vocab_size": 512,
            "hidden_size": 56,
            "intermediate_size": 45,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 128,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "sliding_window": None,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    },
    # As Qwen3: q_norm/k_norm (RMSNorm over head_dim, before RoPE), explicit head_dim 16 while
    # hidden_size / num_attention_heads = 10; untied embeddings; weights stored as F16.
    "tiny-qwen3": {
        "seed": 1004,
        "config": {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "torch_dtype": "float16",
            "vocab_size": 512,
            "hidden_size": 40,
            "intermediate_size": 29,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 128,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "sliding_window": None,
            "use_sliding_window": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    },
    # As GPT-2: Conv1D weights stored (in, out), fused c_attn, learned positions, LayerNorm with
    # bias, gelu_new, tied embeddings; n_embd 60 (not a multiple of 8), 5 heads of 12; dropout 0.
    "tiny-gpt2": {
        "seed": 1005,
        "config": {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "torch_dtype": "float32",
            "vocab_size": GPT2_VOCAB,
            "n_positions": 128,
            "n_embd": 60,
            "n_layer": 2,
            "n_head": 5,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-05,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    },
}

# Fixtures for the quantized base (q8_0 / q4_0: blocks of 32 along each linear weight's input), one
# per architecture, with the input sizes multiples of 32 so that the block formats apply (the
# fixtures above have almost none), except tiny-qwen2-q's down_proj (intermediate 80), which stays
# f16 as llama.cpp keeps such rows out of its blocks. Stored in 16-bit floats to stay small.
QUANT_MODELS: dict[str, dict] = {
    "tiny-llama-q": {
        "seed": 1011,
        "config": {
            **MODELS["tiny-llama"]["config"],
            "torch_dtype": "float16",
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    },
    "tiny-qwen2-q": {
        "seed": 1012,
        "config": {
            **MODELS["tiny-qwen2"]["config"],
            "hidden_size": 64,
            "intermediate_size": 80,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "tiny-qwen3-q": {
        "seed": 1013,
        "config": {
            **MODELS["tiny-qwen3"]["config"],
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
        },
    },
    "tiny-gpt2-q": {
        "seed": 1014,
        "config": {**MODELS["tiny-gpt2"]["config"], "torch_dtype": "float16", "n_embd": 64, "n_head": 4, "n_inner": 96},
    },
}
MODELS.update(QUANT_MODELS)

# ---------------------------------------------------------------------------------------------
# Text fixture


def write_text_fixture() -> str:
    """packages/models/test/fixtures/text/shakespeare-4k.txt: tiny Shakespeare up to the last
    paragraph break before byte 4096. Taken from /work/shared when present, else the committed copy
    is kept (a fresh clone has no /work/shared)."""
    if SHAKESPEARE_SRC.exists():
        src = SHAKESPEARE_SRC.read_bytes()
        if hashlib.sha256(src).hexdigest() != SHAKESPEARE_SRC_SHA256:
            raise SystemExit(f"{SHAKESPEARE_SRC}: unexpected sha256")
        cut = src.rfind(b"\n\n", 0, 4096) + 1
        SHAKESPEARE_4K.parent.mkdir(parents=True, exist_ok=True)
        SHAKESPEARE_4K.write_bytes(src[:cut])
    elif not SHAKESPEARE_4K.exists():
        raise SystemExit(f"neither {SHAKESPEARE_SRC} nor {rel(SHAKESPEARE_4K)} exists")
    data = SHAKESPEARE_4K.read_bytes()
    (SHAKESPEARE_4K.parent / "README.md").write_text(
        "# Text fixtures\n\n"
        f"`shakespeare-4k.txt`: the first {len(data):,} bytes (up to a paragraph break) of tiny Shakespeare,\n"
        "`data/tinyshakespeare/input.txt` of karpathy/char-rnn (https://github.com/karpathy/char-rnn),\n"
        "MIT licence. The whole file is 1,115,394 bytes, sha256 " + SHAKESPEARE_SRC_SHA256 + ";\n"
        f"this excerpt has sha256 {hashlib.sha256(data).hexdigest()}. Written by tools/make_tiny_models.py.\n",
        encoding="utf-8",
    )
    return data.decode("utf-8")


# ---------------------------------------------------------------------------------------------
# Tokenizers


def write_stories_tokenizer(out: Path, max_len: int) -> None:
    """The stories260K tokenizer (512 pieces, adds <s>) for the Llama/Qwen fixtures."""
    src = STORIES_DIR / "tokenizer.json"
    if not src.exists():
        raise SystemExit(f"{rel(src)} is missing: run tools/convert_stories260k.py first")
    shutil.copyfile(src, out / "tokenizer.json")
    cfg = json.loads((STORIES_DIR / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = max_len
    write_json(out / "tokenizer_config.json", cfg)


def write_gpt2_tokenizer(out: Path, text: str, max_len: int) -> None:
    """A byte-level BPE like GPT-2's (ByteLevel pre-tokenizer with GPT-2's regex, no prefix
    space, ByteLevel decoder and post-processor, no BOS added), trained on shakespeare-4k.txt to
    384 entries: <|endoftext|> (id 0), the 256 byte symbols, 127 merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=GPT2_VOCAB,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    if tok.get_vocab_size() != GPT2_VOCAB or tok.token_to_id("<|endoftext|>") != 0:
        raise SystemExit(f"gpt2 tokenizer: vocab {tok.get_vocab_size()}, <|endoftext|> at {tok.token_to_id('<|endoftext|>')}")
    write_json(out / "tokenizer.json", json.loads(tok.to_str()))
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_len,
            "added_tokens_decoder": {
                "0": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
            },
        },
    )


# ---------------------------------------------------------------------------------------------
# Weights


def init_weights(model, cfg: dict, seed: int) -> dict:
    """Seeded random values for every tensor of the model's state dict (sorted by name), by role:
    matrices N(0, 1/fan_in) (GPT-2's Conv1D stores (in, out)), times RESIDUAL_GAIN or QK_GAIN
    where they apply; norm weights U(0.6, 1.4) (q/k_norm times QK_GAIN); biases N(0, 0.2^2);
    untied input embeddings N(0, 1); the output projection (lm_head, or the tied embedding)
    N(0, (2/sqrt(hidden))^2) so that logits have std about 2; positions N(0, 0.1^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    tied = cfg["tie_word_embeddings"]
    is_gpt2 = cfg["model_type"] == "gpt2"
    out_std = LOGIT_STD_TARGET / math.sqrt(hidden)
    sd = {}
    for name, ref in sorted(model.state_dict().items()):
        if tied and name == "lm_head.weight":
            continue  # the same tensor as the embedding; not written (as save_pretrained does)
        shape = tuple(ref.shape)
        randn = torch.randn(shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 2)[-2]
        if name.endswith(("embed_tokens.weight", "wte.weight")):
            value = randn * (out_std if tied else 1.0)
        elif name == "lm_head.weight":
            value = randn * out_std
        elif name.endswith("wpe.weight"):
            value = randn * 0.1
        elif len(shape) == 1 and name.endswith(".weight") and ("norm" in leaf or leaf.startswith("ln_")):
            value = 0.6 + 0.8 * torch.rand(shape, generator=gen, dtype=torch.float32)
            if leaf in ("q_norm", "k_norm"):
                value = value * QK_GAIN
        elif len(shape) == 1 and name.endswith(".bias"):
            value = randn * 0.2
        elif len(shape) == 2:
            fan_in = shape[0] if is_gpt2 else shape[1]
            value = randn / math.sqrt(fan_in)
            if name.endswith(RESIDUAL_OUTPUTS):
                value = value * RESIDUAL_GAIN
            if name.endswith(QK):
                value = value * QK_GAIN
            if name.endswith("attn.c_attn.weight"):  # GPT-2's fused (in, 3 * n_embd): q, k, v columns
                value[:, : 2 * hidden] *= QK_GAIN
        else:
            raise SystemExit(f"no init rule for {name} {shape}")
        sd[name] = value
    return sd


def make_model(name: str, spec: dict, text: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = FIXTURES_DIR / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = spec["config"]
    store = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["torch_dtype"]]
    max_len = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]})
    if cfg["model_type"] == "gpt2":
        write_gpt2_tokenizer(out, text, max_len)
    else:
        write_stories_tokenizer(out, max_len)

    with collect_warnings() as found:
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    if found:
        raise SystemExit(f"{name}: building from config.json warned: {found}")
    sd = {k: v.to(store) for k, v in init_weights(skeleton, cfg, spec["seed"]).items()}
    save_safetensors(out / "model.safetensors", sd)
    n_params = sum(v.numel() for v in sd.values())
    (out / "README.md").write_text(
        f"# {name}\n\n"
        f"A tiny {cfg['architectures'][0]} with seeded random weights (seed {spec['seed']}, stored as "
        f"{cfg['torch_dtype']}, {n_params:,} parameters), written by tools/make_tiny_models.py for tests.\n"
        "Not a trained model: its outputs are meaningless, but deterministic. Golden outputs from\n"
        f"transformers: packages/models/test/golden/forward/{name}.json (tools/golden_forward.py).\n",
        encoding="utf-8",
    )

    # Loads silently and holds exactly what was written.
    model, tok = load_checked(out)
    loaded = model.state_dict()
    for k, v in sd.items():
        if not torch.equal(loaded[k], v.to(torch.float32)):
            raise SystemExit(f"{name}: {k} differs after loading")
    if cfg["tie_word_embeddings"]:
        emb = model.get_input_embeddings().weight
        if model.get_output_embeddings().weight.data_ptr() != emb.data_ptr():
            raise SystemExit(f"{name}: lm_head is not tied to the embedding")
    with torch.no_grad():
        ids = torch.tensor([tok(text[:400])["input_ids"][:48]])
        logits = model(ids).logits[0]
    info = {
        "name": name,
        "arch": cfg["architectures"][0],
        "dtype": cfg["torch_dtype"],
        "params": n_params,
        "bytes": (out / "model.safetensors").stat().st_size,
        "logit_std": float(logits.std()),
        "top2_gap_median": float((logits.topk(2).values[:, 0] - logits.topk(2).values[:, 1]).median()),
    }
    if cfg.get("rope_scaling"):
        # The same weights without rope_scaling must give other logits, or the fixture tests nothing.
        plain = {k: v for k, v in cfg.items() if k not in ("model_type", "rope_scaling")}
        twin = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg["model_type"], **plain))
        twin.load_state_dict(model.state_dict())
        twin.eval()
        with torch.no_grad():
            info["rope_scaling_effect"] = float((twin(ids).logits[0] - logits).abs().max())
    return info


def main() -> None:
    text = write_text_fixture()
    print(f"{rel(SHAKESPEARE_4K)}: {len(text.encode()):,} bytes")
    rows = [make_model(name, spec, text) for name, spec in MODELS.items()]
    print(f"{'model':12} {'architecture':18} {'dtype':9} {'params':>8} {'bytes':>9} {'logit std':>9} {'median top-2 gap':>16}")
    for r in rows:
        print(f"{r['name']:12} {r['arch']:18} {r['dtype']:9} {r['params']:8,} {r['bytes']:9,} {r['logit_std']:9.3f} {r['top2_gap_median']:16.3f}"
              + (f"   max |logits change| without rope_scaling: {r['rope_scaling_effect']:.3f}" if "rope_scaling_effect" in r else ""))
    print("every folder loads without warnings (AutoModelForCausalLM.from_pretrained, PreTrainedTokenizerFast(tokenizer_file=...))")
    # The GPT-2 tokenizer round-trips the text; the stories one is checked by convert_stories260k.py.
    gpt2_tok = tokenizer_from_file(FIXTURES_DIR / "tiny-gpt2")
    if (FIXTURES_DIR / "tiny-gpt2-q" / "tokenizer.json").read_bytes() != (FIXTURES_DIR / "tiny-gpt2" / "tokenizer.json").read_bytes():
        raise SystemExit("tiny-gpt2-q's tokenizer differs from tiny-gpt2's")
    ids = gpt2_tok(text)["input_ids"]
    if gpt2_tok.decode(ids) != text:
        raise SystemExit("tiny-gpt2 tokenizer does not round-trip shakespeare-4k.txt")
    print(f"tiny-gpt2 tokenizer: {len(ids)} tokens for shakespeare-4k.txt, decode(encode(text)) == text")


if __name__ == "__main__":
    main()
