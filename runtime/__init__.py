"""gpt-oss runtime: sharded loading, batched harmony generation, rank-0 collection.

    from runtime import Engine, Request, compose
    engine = Engine(compose("generate", ["model=tiny"]))
    records = engine.generate([Request(id="0", prompt="Hello")])

Imports are lazy so that `runtime.config` (used by the launcher) does not pull in torch.
"""

from typing import Any

__all__ = ["Engine", "Request", "compose"]


def __getattr__(name: str) -> Any:
    if name == "compose":
        from runtime.config import compose

        return compose
    if name in ("Engine", "Request"):
        from runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
