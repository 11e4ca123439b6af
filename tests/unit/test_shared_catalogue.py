"""rigshift.catalogue: the one GPU table, what its users read from it, and its docs table."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from broker.economics import FarmTerms, floor_price
from harness.broker_fixtures import make_gpu
from rigshift.catalogue import (
    BY_KEY,
    CATALOGUE,
    DEFAULT_BOARD_WATTS,
    DEFAULT_VRAM_MB,
    board_watts,
    lookup,
    model_key,
    vram_mb,
)
from worker_agent.gpu import SimulatedBackend
from worker_agent.mining import ai_micros_per_kwh

DOCS = Path(__file__).resolve().parents[2] / "docs" / "gpu.md"


def test_table_has_mining_farm_gpus() -> None:
    for key in ("RTX3060", "RTX3060TI", "RTX3070", "RTX3080", "RTX3090", "RX6800XT", "A4000"):
        assert key in BY_KEY
    assert len(BY_KEY) == len(CATALOGUE)  # no two models share a key
    for m in CATALOGUE:
        assert 0 < m.idle_w < m.board_power_w
        assert m.vram_mb >= 8192 and m.vram_mb % 1024 == 0  # whole GiB, in MiB
        assert m.pcie_link_width in (1, 4, 16)
        assert m.default_price_micros_per_gpu_hour > 0
    assert BY_KEY["CMP90HX"].pcie_link_width == 4  # CMP cards are wired x4
    assert BY_KEY["RTX3090"].pcie_link_width == 1  # on a mining riser


@pytest.mark.parametrize(
    ("name", "key"),
    [("RTX 3090", "RTX3090"), ("rtx3060 ti", "RTX3060TI"), ("RX 6800 XT", "RX6800XT")],
)
def test_models_match_without_spaces_and_case(name: str, key: str) -> None:
    assert model_key(name) == key
    entry = lookup(name)
    assert entry is not None and entry.key == key


def test_unknown_models_get_the_defaults() -> None:
    assert lookup("GTX 1080") is None
    assert board_watts("GTX 1080") == DEFAULT_BOARD_WATTS == 250
    assert vram_mb("GTX 1080") == DEFAULT_VRAM_MB == 16_384
    assert board_watts("RTX 3090") == 350
    assert vram_mb("RTX 3060") == 12_288


def test_the_simulated_rig_registers_catalogue_figures() -> None:
    backend = SimulatedBackend("RTX3090,CMP90HX", seed="s")
    for gpu, m in zip(backend.gpus(), (BY_KEY["RTX3090"], BY_KEY["CMP90HX"]), strict=True):
        assert (gpu.model, gpu.vram_mb, gpu.power_limit_watts, gpu.pcie_link_width) == (
            m.name,
            m.vram_mb,
            m.board_power_w,
            m.pcie_link_width,
        )
        assert gpu.default_price_micros_per_gpu_hour == m.default_price_micros_per_gpu_hour


def test_the_broker_prices_floors_with_catalogue_watts() -> None:
    terms = FarmTerms("f", tariff_micros_per_kwh=100_000)
    for m in CATALOGUE:
        # W x 1 h = W/1000 kWh at $0.10/kWh, PUE 1: e.g. 350 W -> 35000 micro-dollars
        assert floor_price(terms, m.name).energy_cost_micros == m.board_power_w * 100
    assert floor_price(terms, "GTX 1080").watts == DEFAULT_BOARD_WATTS


def test_fixtures_and_the_agent_read_the_catalogue() -> None:
    assert make_gpu(0, "RTX 3060").vram_mb == 12_288
    assert make_gpu(0, "GTX 1080").vram_mb == DEFAULT_VRAM_MB
    gpu = replace(SimulatedBackend("RTX3090").gpus()[0], power_limit_watts=0)
    # no reported limit: catalogue watts, 350 W -> $0.35/GPU-h / 0.35 kWh = $1/kWh
    assert ai_micros_per_kwh(350_000, gpu) == 1_000_000


def _docs_rows() -> list[list[str]]:
    text = DOCS.read_text()
    table = text[text.index("| SPEC name |") :].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in table]


def test_the_docs_table_is_the_catalogue() -> None:
    """docs/gpu.md lists every model with the catalogue's figures, in its order."""
    rows = _docs_rows()
    assert len(rows) == len(CATALOGUE)
    for row, m in zip(rows, CATALOGUE, strict=True):
        key, name, vram, board, idle, width, ask = row
        assert (key, name, int(vram), int(board), int(idle)) == (
            m.key,
            m.name,
            m.vram_mb,
            m.board_power_w,
            m.idle_w,
        )
        width_match = re.match(r"x(\d+)", width)
        assert width_match is not None and int(width_match[1]) == m.pcie_link_width
        assert round(float(ask) * 1_000_000) == m.default_price_micros_per_gpu_hour
