"""The score step: small free functions, and the total order they make (STYLE.md 2)."""

from __future__ import annotations

__all__ = ["ChoiceKey", "best_fit_leftover", "choice_key", "locality_score"]

ChoiceKey = tuple[int, int, int, int, str, int, str]


def best_fit_leftover(free_in_group: int, gpu_count: int) -> int:
    """Free GPUs left in the worker's group after placing; lower packs tighter."""
    return free_in_group - gpu_count


def locality_score(environments: frozenset[str], environment: str) -> int:
    """1 when the worker already holds what the job's setup would fetch, else 0: its
    container image (the job's reference among the references the rig reports, by tag or
    by digest) for an image job, else its Python environment (requirements_sha256). A job
    with neither scores 0 everywhere."""
    return 1 if environment and environment in environments else 0


def choice_key(
    price_micros: int,
    free_in_group: int,
    gpu_count: int,
    worker_id: str,
    vram_mb: int,
    model: str,
    reliability_permille: int = 1000,
    locality: int = 0,
) -> ChoiceKey:
    """Total order over candidate (worker, group) pairs; the smallest wins::

        (price, -locality, leftover, -reliability_permille, worker_id, vram_mb, model)

    i.e. cheapest; then a worker that holds the job's environment (:func:`locality_score`);
    then the tightest fit (:func:`best_fit_leftover`); then the most reliable worker; then
    the lowest worker id. ``vram_mb`` and ``model`` only break ties between two groups of
    one worker at one price. Price comes first: the client pays it, while a cold setup
    costs the client nothing (setup is not charged at the GPU price)."""
    leftover = best_fit_leftover(free_in_group, gpu_count)
    return (price_micros, -locality, leftover, -reliability_permille, worker_id, vram_mb, model)
