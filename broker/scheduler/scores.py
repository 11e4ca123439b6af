"""The score step: small free functions, and the total order they make (STYLE.md 2)."""

from __future__ import annotations

__all__ = ["ChoiceKey", "best_fit_leftover", "choice_key", "locality_score", "topology_score"]

ChoiceKey = tuple[int, int, int, int, int, str, int, str]


def best_fit_leftover(free_in_group: int, gpu_count: int) -> int:
    """Free GPUs left in the worker's group after placing; lower packs tighter."""
    return free_in_group - gpu_count


def locality_score(environments: frozenset[str], environment: str) -> int:
    """1 when the worker already holds what the job's setup would fetch, else 0: its
    container image (the job's reference among the references the rig reports, by tag or
    by digest) for an image job, else its Python environment (requirements_sha256). A job
    with neither scores 0 everywhere."""
    return 1 if environment and environment in environments else 0


def topology_score(pcie_mbps: int, gpu_count: int, min_pcie_mbps: int) -> int:
    """Where a job's gang should go by link width; lower is preferred.

    A job that gangs several GPUs (they exchange gradients through the host) or asks for
    bandwidth (``min_pcie_mbps``) prefers the widest links: ``-pcie_mbps``. A single-GPU
    job that asks for none prefers the narrowest: ``+pcie_mbps``, so riser rigs take the
    small work and x16 rigs keep their slots for the gangs."""
    return -pcie_mbps if gpu_count > 1 or min_pcie_mbps else pcie_mbps


def choice_key(
    price_micros: int,
    free_in_group: int,
    gpu_count: int,
    worker_id: str,
    vram_mb: int,
    model: str,
    reliability_permille: int = 1000,
    locality: int = 0,
    topology: int = 0,
) -> ChoiceKey:
    """Total order over candidate (worker, group) pairs; the smallest wins::

        (price, topology, -locality, leftover, -reliability_permille, worker_id, vram_mb,
         model)

    i.e. cheapest; then the link width the job should have (:func:`topology_score`: the
    widest for a gang or a job with ``min_pcie``, the narrowest for a single GPU); then a
    worker that holds the job's environment (:func:`locality_score`); then the tightest
    fit (:func:`best_fit_leftover`); then the most reliable worker; then the lowest worker
    id. ``vram_mb`` and ``model`` only break ties between two groups of one worker at one
    price; groups of one worker that tie on all of it go unverified first, then the lowest
    score first (the index's group order), keeping the better GPUs for stricter jobs.

    Price comes first: the client pays it, while a cold setup costs the client nothing
    (setup is not charged at the GPU price). Topology comes before locality: a gang on
    risers is slow for all of its run, a cold setup costs once."""
    leftover = best_fit_leftover(free_in_group, gpu_count)
    return (
        price_micros,
        topology,
        -locality,
        leftover,
        -reliability_permille,
        worker_id,
        vram_mb,
        model,
    )
