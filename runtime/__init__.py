"""gpt-oss runtime: sharded loading, batched harmony generation, rank-0 collection.

    from runtime import Engine, Request, compose
    engine = Engine(compose("generate", ["model=tiny"]))
    records = engine.generate([Request(id="0", prompt="Hello")])
"""

from runtime.config import compose
from runtime.engine import Engine, Request

__all__ = ["Engine", "Request", "compose"]
