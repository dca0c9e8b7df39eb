"""Arrival counters for kernels whose last program to finish a piece of work does its final step: decode
attention's split merge (runtime/kernels/flash.py) and the router's top-k after its GEMV (runtime/kernels/router.py).

Each program counts itself in on its piece's counter with an acquire-release atomic; the one that arrives last
reads what the others wrote and resets the counter, so a table is all zeros between calls. One table per device
and kernel, made at load (`prepare`), outside any compiled or captured code: a tensor made inside a traced step
would be re-made, and re-zeroed by a launch, at every call.
"""

from __future__ import annotations

import torch

SLOTS = 1 << 16
"""Pieces one call may have (beyond: the kernels take their path without counters)."""
KERNELS = ("flash", "router")
_tables: dict[tuple[torch.device, str], torch.Tensor] = {}


def prepare(device: torch.device) -> None:
    """Make every kernel's table for `device` (at load; again is a no-op)."""
    for kernel in KERNELS:
        if (device, kernel) not in _tables:
            _tables[device, kernel] = torch.zeros(SLOTS, dtype=torch.int32, device=device)


def table(device: torch.device, kernel: str) -> torch.Tensor | None:
    """`kernel`'s counters on `device`, made eagerly here on a first eager call; None inside compiled or captured
    code when `prepare` has not run (a fill in a capture would only happen at a replay)."""
    assert kernel in KERNELS, (kernel, KERNELS)
    if (device, kernel) not in _tables and not torch.compiler.is_compiling() \
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        prepare(device)
    return _tables.get((device, kernel))
