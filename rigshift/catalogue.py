"""The GPU catalogue: the models former mining farms own, one table for every package.

The agent simulates rigs from it and fills in what NVML does not report
(``worker_agent.gpu``, ``worker_agent.mining``); the broker prices floors with its
board power when no GPU of a model has registered yet (``broker.economics``); test
fixtures and the benchmarks build fleets from it (``harness.broker_fixtures``,
``benchmarks/``). A model is matched without spaces and case
(:func:`model_key`: ``RTX 3090`` == ``rtx3090``).

Where the figures come from:

- ``vram_mb``: the vendors' specifications (NVIDIA GeForce RTX 30 series, RTX
  A4000/A5000 and CMP HX data sheets; AMD Radeon RX 6000 series), in MiB as NVML
  reports them (a "24 GB" RTX 3090 is 24576 MiB).
- ``board_power_w``: the vendors' total board power (TGP/TBP) of the reference
  card, which is also NVML's default power limit; the CMP 90HX's 320 W is NVIDIA's
  figure for the CMP HX line (125 W to 320 W, the 90HX at the top).
- ``idle_w``: a typical idle draw of such a card with no display attached; only the
  simulated power model uses it (``docs/gpu.md``).
- ``pcie_link_width``: how farms usually mount the card, not what it supports: x1 on
  a mining riser, x4 for CMP cards (wired x4), x16 in a slot for workstation cards.
- ``default_price_micros_per_gpu_hour``: Rigshift's own starting ask per GPU-hour
  (an operator sets theirs with ``--price`` or per model for the farm); not a
  market quote.

There are no hash rates here: mining revenue is the operator's figure per kWh
(``docs/economics.md``), never derived from the card.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "BY_KEY",
    "CATALOGUE",
    "DEFAULT_BOARD_WATTS",
    "DEFAULT_VRAM_MB",
    "GpuModel",
    "board_watts",
    "lookup",
    "model_key",
    "vram_mb",
]


def model_key(model: str) -> str:
    """A GPU model name compared without spaces and case: ``RTX 3090`` -> ``RTX3090``."""
    return model.replace(" ", "").upper()


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One GPU model of the catalogue (see the module docstring for the sources)."""

    name: str
    """Marketing name, as NVML reports it without the vendor prefix, e.g. ``RTX 3090``."""
    vram_mb: int
    """Memory in MiB."""
    board_power_w: int
    """Board power limit in watts (what the card draws flat out)."""
    idle_w: int
    """Draw at idle in watts."""
    pcie_link_width: int
    """PCIe lanes of the usual mounting: 1 on a mining riser, 4 for CMP cards, 16 in a slot."""
    default_price_micros_per_gpu_hour: int
    """Default ask price in micro-dollars per GPU-hour."""

    @property
    def key(self) -> str:
        """The compact name, e.g. ``RTX3060TI``: a ``--simulate`` SPEC names models by it."""
        return model_key(self.name)


CATALOGUE: tuple[GpuModel, ...] = (
    #        name           VRAM MiB  board W  idle W  PCIe  ask micro-$/GPU-h
    GpuModel("RTX 3060", 12_288, 170, 13, 1, 90_000),
    GpuModel("RTX 3060 Ti", 8_192, 200, 14, 1, 100_000),
    GpuModel("RTX 3070", 8_192, 220, 15, 1, 120_000),
    GpuModel("RTX 3070 Ti", 8_192, 290, 17, 1, 130_000),
    GpuModel("RTX 3080", 10_240, 320, 20, 1, 170_000),
    GpuModel("RTX 3080 Ti", 12_288, 350, 22, 1, 200_000),
    GpuModel("RTX 3090", 24_576, 350, 25, 1, 250_000),
    GpuModel("RX 6700 XT", 12_288, 230, 8, 1, 80_000),
    GpuModel("RX 6800 XT", 16_384, 300, 9, 1, 110_000),
    GpuModel("A4000", 16_384, 140, 10, 16, 180_000),
    GpuModel("A5000", 24_576, 230, 15, 16, 280_000),
    GpuModel("CMP 90HX", 10_240, 320, 18, 4, 60_000),
)
"""Every model, in this order (the docs' table follows it)."""

BY_KEY: Mapping[str, GpuModel] = MappingProxyType({m.key: m for m in CATALOGUE})
"""The catalogue by :func:`model_key` (``RTX3090``, ``RX6800XT``, ``CMP90HX``)."""

DEFAULT_BOARD_WATTS = 250
"""Board power assumed for a model the catalogue does not hold."""

DEFAULT_VRAM_MB = 16_384
"""VRAM assumed for a model the catalogue does not hold (test fixtures, trace replay)."""


def lookup(model: str) -> GpuModel | None:
    """The catalogue entry of ``model`` (matched without spaces and case), or None."""
    return BY_KEY.get(model_key(model))


def board_watts(model: str) -> int:
    """Board power of ``model`` in watts; :data:`DEFAULT_BOARD_WATTS` when unknown."""
    entry = lookup(model)
    return entry.board_power_w if entry is not None else DEFAULT_BOARD_WATTS


def vram_mb(model: str) -> int:
    """VRAM of ``model`` in MiB; :data:`DEFAULT_VRAM_MB` when unknown."""
    entry = lookup(model)
    return entry.vram_mb if entry is not None else DEFAULT_VRAM_MB
