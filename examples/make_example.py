"""Make examples/deepspeed-zero2/: a tiny real DeepSpeed checkpoint the README converts.

It trains the interop suite's small model (tied embedding/head, a frozen parameter, buffers,
two param groups) for two steps with real DeepSpeed on CPU, ZeRO-2, bf16, two ranks, and keeps
the checkpoint root (``latest`` and the tag folder) without the scripts DeepSpeed copies beside
it. Needs the DeepSpeed install of the README's test command.

    python examples/make_example.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))

import corpus  # noqa: E402

CASE = "z2_w2_bf16"
OUT = HERE / "deepspeed-zero2"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = corpus.build([CASE], tmp)[CASE]
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir()
        tag = (root / "latest").read_text().strip()
        shutil.copy(root / "latest", OUT / "latest")
        shutil.copytree(root / tag, OUT / tag)
    for extra in OUT.rglob("zero_to_*.py"):
        extra.unlink()
    print(
        f"wrote {OUT}: "
        + ", ".join(sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*") if p.is_file()))
    )


if __name__ == "__main__":
    main()
