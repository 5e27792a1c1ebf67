"""What a folder that is no checkpoint layoutc reads holds, said so that the user can act:
another framework's checkpoint named as such, a DeepSpeed root without ``latest`` named with
its tags, an empty folder as empty. Reads names only (no file is opened).
"""

from __future__ import annotations

import re
from pathlib import Path

SHOWN = 5  # names listed before "and N more"


def describe(folder: Path) -> str:
    """Why ``folder`` is not a checkpoint layoutc reads, and what to do instead."""
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        return f"cannot be listed ({e.strerror or e})"
    if not names:
        return "is empty"
    megatron = "latest_checkpointed_iteration.txt" in names or any(
        re.fullmatch(r"iter_\d{7}", n) for n in names
    )
    if megatron or any(re.fullmatch(r"mp_rank_\d\d(_\d{3})?", n) for n in names):
        return (
            "is a Megatron-LM checkpoint (iter_*/mp_rank_*/model_optim_rng.pt), which layoutc "
            "does not read"
        )
    tags = [n for n in names if (folder / n).is_dir() and _deepspeed_tag(folder / n)]
    if tags:
        return (
            f"holds DeepSpeed tag folders ({_listing(tags)}), no `latest` file naming one: "
            "give one with --tag, or the tag folder itself"
        )
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return (
            "is a Hugging Face model folder without model.safetensors, pytorch_model.bin or "
            "an index of either, the weights layoutc reads"
        )
    return (
        "is not a checkpoint layoutc reads (a DeepSpeed checkpoint, a PyTorch distributed "
        f"checkpoint, safetensors or torch weights); it holds {_listing(names)}"
    )


def _deepspeed_tag(folder: Path) -> bool:
    return any(folder.glob("*model_states.pt"))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
