"""The rule a fixed `train.micro_batch_size` must follow, free of torch and pydantic: the config
checks it when it loads (pipeline/config.py), and the training loop (pipeline/micro_batch.py)
uses the divisors when it halves a piece, so that the trainer imports on machines with torch
alone (the GPU image lacks pydantic)."""

from __future__ import annotations


def divisors(n: int) -> list[int]:
    """n's divisors, largest first."""
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def micro_batch_problem(micro: int | str | None, rows: int, processes: int = 1) -> str | None:
    """What is wrong with a fixed `train.micro_batch_size` for a share of `rows` blocks, or None
    (here, free of torch, for the config's own check; pipeline/micro_batch.py uses the pieces)."""
    if micro in (None, "auto") or rows % int(micro) == 0:
        return None
    where = f"each of {processes} processes takes" if processes > 1 else "a batch holds"
    return (f"train.micro_batch_size: {micro} does not divide the {rows} blocks {where}; use one of "
            f"{', '.join(map(str, reversed(divisors(rows))))}, or auto")
