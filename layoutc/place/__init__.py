"""Place: a checked layout to its shard map in its storage format. Pure arithmetic."""

from __future__ import annotations

from layoutc import ir
from layoutc.place.base import Placement
from layoutc.place.dcp import DcpPlacement
from layoutc.place.deepspeed import DeepSpeedPlacement
from layoutc.place.full import SafetensorsPlacement, TorchPlacement, UniversalPlacement

PLACEMENTS: dict[str, type[Placement]] = {
    "deepspeed": DeepSpeedPlacement,
    "universal": UniversalPlacement,
    "safetensors": SafetensorsPlacement,
    "torch": TorchPlacement,
    "dcp": DcpPlacement,
}


def place(layout: ir.Layout) -> Placement:
    """The shard map of ``layout`` in the format its ``store`` names."""
    return PLACEMENTS[layout.store.format](layout)


__all__ = ["PLACEMENTS", "Placement", "place"]
