"""Golden data for the Q8_0 / Q4_0 quantizers (packages/core/test/golden/quant.json), from the
`gguf` Python package, whose quantize_blocks reproduce ggml's reference quantizers
(quantize_row_q8_0_ref, quantize_row_q4_0_ref) bit for bit.

Each case is a run of f32 values (base64, little-endian) with, per format, the blocks as a GGUF
file stores them ([f16 d][qs], base64) and their dequantization (base64 f32). The cases cover
ordinary weights at several scales, exact rounding ties (roundf's halves away from zero; Q4_0's
+8.5 truncation), Q4_0's clip of +8 to 15, a value of largest magnitude that is negative or
positive or tied with its opposite, all-zero blocks and scales that are f16 subnormals.

`k_quants`: random Q4_K and Q6_K super-blocks (random bytes with finite f16 scales) and the
package's dequantization of them, for the GGUF loader's k-quant decoders.

Run from the repository root (after `bash tools/setup-python.sh`):

    tools/.venv/bin/python tools/golden_quant.py
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import REPO_ROOT, write_json  # noqa: E402

OUT = REPO_ROOT / "packages/core/test/golden/quant.json"
BLOCK = 32


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    out: list[tuple[str, np.ndarray]] = []
    for scale in (1e-3, 0.02, 1.0, 300.0):
        out.append((f"normal x {scale}", (rng.standard_normal(16 * BLOCK) * scale).astype(np.float32)))
    out.append(("uniform heavy tails", (rng.standard_t(2, 8 * BLOCK) * 0.05).astype(np.float32)))

    # Q8_0 ties: absmax 127 gives d = 1 exactly, so x * (1/d) = x and k + 0.5 rounds away from 0.
    ties8 = np.arange(-15.5, 16.5, 1.0, dtype=np.float32)
    ties8[0] = -127.0
    out.append(("q8_0 ties at d = 1", ties8))

    # Q4_0 ties: the largest magnitude -8 gives d = 1, so x + 8.5 is exact; +8 clips to 15.
    t4 = np.array([-8.0, -7.5, -0.5, 0.5, 1.5, -1.5, 7.5, 8.0] + [k * 0.5 for k in range(-12, 12)], dtype=np.float32)
    out.append(("q4_0 ties at d = 1", t4))
    pos = t4.copy()
    pos[0] = 8.0  # now d = -1
    out.append(("q4_0 ties at d = -1", pos))
    tie = (rng.standard_normal(BLOCK) * 0.1).astype(np.float32)
    tie[5], tie[20] = 0.75, -0.75  # equal magnitude, the first wins
    out.append(("q4_0 opposite extremes", tie))

    z = np.zeros(2 * BLOCK, dtype=np.float32)
    z[BLOCK + 3] = -0.0
    out.append(("zero blocks", z))
    out.append(("f16-subnormal scales", (rng.standard_normal(4 * BLOCK) * 1e-6).astype(np.float32)))
    return out


def main() -> None:
    from importlib.metadata import version

    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    records = []
    for name, x in cases():
        assert x.dtype == np.float32 and x.size % BLOCK == 0, name
        rec = {"name": name, "values": b64(x)}
        for fmt, qt in (("q8_0", T.Q8_0), ("q4_0", T.Q4_0)):
            blocks = quantize(x.reshape(-1, BLOCK), qt)
            back = dequantize(blocks, qt).astype(np.float32).reshape(-1)
            rec[fmt] = {"blocks": b64(blocks), "dequantized": b64(back)}
        records.append(rec)
    rng = np.random.default_rng(99)
    k_quants = []
    for qt, name, size, scale_at in ((T.Q4_K, "Q4_K", 144, (0, 2)), (T.Q6_K, "Q6_K", 210, (208,))):
        blocks = rng.integers(0, 256, size=(6, size), dtype=np.uint8)
        for at in scale_at:
            d = (rng.standard_normal(6) * 0.01).astype(np.float16)
            blocks[:, at : at + 2] = d.view(np.uint8).reshape(6, 2)
        back = dequantize(blocks, qt).astype(np.float32).reshape(-1)
        k_quants.append({"type": name, "blocks": b64(blocks), "dequantized": b64(back)})
    meta = {"script": "tools/golden_quant.py", "gguf": version("gguf"), "numpy": np.__version__}
    write_json(OUT, {"generated_by": meta, "cases": records, "k_quants": k_quants}, pretty_lists=False)
    print(f"{len(records)} cases -> {OUT.relative_to(REPO_ROOT)} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
