"""Make the tiny real DeepSpeed checkpoints in examples/ that the README and docs convert.

    deepspeed-zero2   the interop suite's small model (tied embedding/head, a frozen
                      parameter, buffers, two param groups), ZeRO-2, bf16, two ranks
    deepspeed-moe     its native mixture-of-experts model (two MoE layers of 4 and 8
                      experts, the second PR-MoE with top-2 gating), ZeRO-2, bf16, two
                      ranks, expert parallelism 2

Each is trained for two steps with real DeepSpeed on CPU; the checkpoint root (``latest``
and the tag folder) is kept without the scripts DeepSpeed copies beside it. Needs the
DeepSpeed install of the README's test command.

    python examples/make_example.py [deepspeed-zero2] [deepspeed-moe]   (default: both)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))

import corpus  # noqa: E402

EXAMPLES = {"deepspeed-zero2": "z2_w2_bf16", "deepspeed-moe": "moe_z2_w2_ep2_bf16"}


def make(name: str) -> None:
    case, out = EXAMPLES[name], HERE / name
    with tempfile.TemporaryDirectory() as tmp:
        root = corpus.build([case], tmp)[case]
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        tag = (root / "latest").read_text().strip()
        shutil.copy(root / "latest", out / "latest")
        shutil.copytree(root / tag, out / tag)
    for extra in out.rglob("zero_to_*.py"):
        extra.unlink()
    print(
        f"wrote {out}: "
        + ", ".join(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    )


def main() -> None:
    for name in sys.argv[1:] or list(EXAMPLES):
        make(name)


if __name__ == "__main__":
    main()
