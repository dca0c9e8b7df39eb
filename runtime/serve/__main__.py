"""OpenAI-compatible server (Responses and Chat Completions) for gpt-oss, sharded over every rank.

    python -m runtime.serve                                       # tiny model, CPU ok, http://127.0.0.1:8000/v1
    torchrun --nproc_per_node=4 -m runtime.serve model=gpt-oss-120b model.path=/ckpt/gpt-oss-120b \
        parallel.tp_size=4 serve.port=8000
    curl -N localhost:8000/v1/responses -H 'Content-Type: application/json' \
        -d '{"model": "gpt-oss-120b", "input": "hi", "stream": true}'

Rank 0 binds the port at once (GET /health says `loading` until the model is in), writes
<serve.out_dir>/config.yaml and, once it answers requests, <serve.out_dir>/endpoint.json. It stops on
SIGINT/SIGTERM/SIGUSR1 or the stop file ($GPTOSS_STOP_FILE); requests in flight then get an error.
Every field: runtime/config.py (ServeConfig).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from runtime import checkpoint, collect, config, distributed, harmony
from runtime.errors import UserError
from runtime.preemption import StopRequest
from runtime.serve.http import App, make_server
from runtime.serve.job import Defaults, Job

log = logging.getLogger("runtime.serve")


def check(cfg: DictConfig, world_size: int) -> None:
    """What the serve job needs beyond the generate job's checks; before any weight is read."""
    sc, par = cfg.serve, cfg.parallel
    if par.dp_size != 1:
        raise UserError(
            f"parallel.dp_size={par.dp_size}: a server runs one model replica; spread all {world_size} ranks "
            "over tp_size/ep_size, or start one server per replica behind a load balancer"
        )
    if cfg.generation.kv_cache != "static":
        raise UserError(f"generation.kv_cache={cfg.generation.kv_cache}: the server always uses its own paged KV "
                        "cache; drop the override")
    if not 0 <= sc.port <= 65535:
        raise UserError(f"serve.port={sc.port}: use a TCP port (0 picks a free one)")
    for key, low in (("max_batch", 1), ("max_len", 2), ("max_prefill_tokens", 1), ("max_waiting", 1),
                     ("max_connections", 1)):
        if sc[key] < low:
            raise UserError(f"serve.{key}={sc[key]} must be >= {low}")
    if sc.kv_cache_tokens is not None and sc.kv_cache_tokens < sc.max_len:
        raise UserError(f"serve.kv_cache_tokens={sc.kv_cache_tokens} cannot hold one request of serve.max_len="
                        f"{sc.max_len} tokens: raise it to at least {sc.max_len}, or lower serve.max_len")
    util = sc.gpu_memory_utilization
    if util is not None and sc.kv_cache_tokens is not None:
        raise UserError("serve.kv_cache_tokens and serve.gpu_memory_utilization both size the KV cache: set one")
    if util is not None and not 0 < util <= 1:
        raise UserError(f"serve.gpu_memory_utilization={util}: give a fraction of GPU memory in (0, 1], e.g. 0.9")
    if util is not None and cfg.model.device == "cpu":
        raise UserError("serve.gpu_memory_utilization sizes the KV cache from GPU memory; with model.device=cpu set "
                        "serve.kv_cache_tokens or serve.max_batch (and drop serve.gpu_memory_utilization)")
    if not (math.isfinite(sc.timeout_seconds) and 0 < sc.timeout_seconds <= 86400):
        raise UserError(f"serve.timeout_seconds={sc.timeout_seconds} must be between 0 and 86400 seconds")
    if not (math.isfinite(sc.stats_seconds) and sc.stats_seconds >= 0):
        raise UserError(f"serve.stats_seconds={sc.stats_seconds}: give the seconds between stats lines, or 0 for none")
    if Path(sc.out_dir).exists() and not Path(sc.out_dir).is_dir():
        raise UserError(f"serve.out_dir={sc.out_dir} is a file: name a directory for config.yaml and endpoint.json")


def run(cfg: DictConfig) -> None:
    config.check_schema(cfg, config.ServeJobConfig)
    par, sc, gen = cfg.parallel, cfg.serve, cfg.generation
    check(cfg, distributed.env_world()[0])
    layout = distributed.make_layout(par.tp_size, par.ep_size, par.dp_size)
    distributed.silence_non_writers(layout)
    limit = checkpoint.max_positions(cfg.model)
    if limit is not None and sc.max_len > limit:
        raise UserError(f"serve.max_len={sc.max_len} exceeds the model's {limit} positions: lower it")
    harmony.encoding()  # the vocabulary is in place before any request needs it
    name = sc.model_name or cfg.model.name
    app: App | None = None
    server = None
    if layout.is_writer:
        out_dir = Path(sc.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = config.to_container(cfg)
        if saved["serve"]["api_key"]:
            saved["serve"]["api_key"] = "<redacted>"
        OmegaConf.save(OmegaConf.create(saved), out_dir / "config.yaml")
        defaults = Defaults(name, gen.temperature if gen.do_sample else 0.0, gen.top_p, gen.reasoning_effort)
        app = App(defaults, sc.max_len, _render, api_key=sc.api_key or os.environ.get("GPTOSS_API_KEY") or None,
                  ready=threading.Event())
        try:
            server = make_server(app, sc.host, sc.port, sc.timeout_seconds, sc.max_connections)
        except OSError as e:
            raise UserError(f"cannot listen on {sc.host}:{sc.port} ({e.strerror or e}): choose another "
                            "serve.port (0 picks a free one) or serve.host") from None
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        log.info("listening on %s:%d; loading the model (GET /health answers `loading` until then)",
                 sc.host, server.server_address[1])
        if sc.host in ("", "0.0.0.0", "::") and not app.api_key:
            log.warning("serve.host=%r answers every network this machine is on, and no API key is set: anyone who "
                        "can reach port %d can use the model (set serve.api_key or GPTOSS_API_KEY)",
                        sc.host, server.server_address[1])

    stop = StopRequest.from_env()  # installed before loading: a stop during loading is honoured
    signal.signal(signal.SIGINT, lambda *_: setattr(stop, "signalled", signal.SIGINT))  # rank 0 stops everyone

    from runtime.continuous import ContinuousBatcher
    from runtime.engine import CALL, Engine
    from runtime.kvcache import BLOCK_SIZE, blocks_for, sliding_layers, window_reserve
    from runtime.serve.scheduler import Scheduler, follow

    engine = Engine(cfg)
    import torch  # loaded by now (the HTTP port was bound before any of it)

    per_block = _block_bytes(engine)
    rows = sc.max_batch
    _, window = sliding_layers(engine.hf_config)
    if sc.gpu_memory_utilization is not None:
        blocks = _blocks_in_memory(engine, sc, per_block, layout)
    else:  # the full layers' tokens, and the sliding layers' windows beside them
        tokens = sc.kv_cache_tokens if sc.kv_cache_tokens is not None else rows * sc.max_len
        blocks = blocks_for(tokens) + window_reserve(rows, window, sc.max_prefill_tokens, blocks_for(sc.max_len))
    try:
        batcher = ContinuousBatcher(
            engine.model, engine.dtype, engine.device, rows, sc.max_len, sc.max_prefill_tokens,
            gen.cuda_graph, gen.compile, engine.groups.mp, layout.is_replica_leader, engine.generator,
            num_blocks=blocks, combo_kernels=gen.combo_kernels,
        )
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e):
            raise
        raise UserError(f"a KV cache of {blocks * BLOCK_SIZE} tokens ({blocks * per_block / 1e9:.1f} GB on each rank) "
                        "does not fit: lower serve.kv_cache_tokens (or serve.max_batch x serve.max_len), or set "
                        "serve.gpu_memory_utilization to size it from the memory left") from None
    warm = batcher.warm_up()  # compile, capture and autotune before /health says ok (every rank at once)
    if layout.is_writer:
        context = (blocks - window_reserve(rows, window, sc.max_prefill_tokens, blocks_for(sc.max_len))) * BLOCK_SIZE
        log.info("KV cache: %d blocks of %d, %d tokens of context (%.1f requests of serve.max_len=%d)%s, %.2f GB on "
                 "this rank; %d rows; decode step sizes %s; warm-up (compile, graph capture) %.1f s: %s", blocks,
                 BLOCK_SIZE, context, context / sc.max_len, sc.max_len,
                 f" beside the sliding-window layers' blocks (a request's last {window} tokens)" if window else "",
                 batcher.cache.nbytes / 1e9, rows, batcher.buckets, warm, batcher.warm_up_summary())
        scheduler = Scheduler(batcher, layout, engine.stop_ids, CALL, sc.max_waiting, stop, sc.prefix_cache,
                              sc.stats_seconds, lambda: server.writer.busy_seconds, cfg.generation.async_scheduling)
        assert app is not None and app.ready is not None and server is not None
        app.end_ids = frozenset(engine.stop_ids)
        app.backend = scheduler
        app.ready.set()
        _announce(server, sc, name, bool(app.api_key))
        try:
            scheduler.run()
        finally:
            server.shutdown()
            server.server_close()
            log.info("stopped: %s", scheduler.stats())
    else:
        follow(batcher, layout)
    engine.close(batcher)


def _block_bytes(engine: Any) -> int:
    """Device bytes of one KV-cache block on this rank (its KV heads, in the pools of every layer pair)."""
    from runtime.kvcache import block_bytes, pool_tensors, sliding_layers

    attn = engine.model.model.layers[0].self_attn
    kv_heads = attn.k_proj.out_features // attn.head_dim
    return block_bytes(pool_tensors(sliding_layers(engine.hf_config)[0]), kv_heads, attn.head_dim, engine.dtype)


def _blocks_in_memory(engine: Any, sc: DictConfig, per_block: int, layout: Any) -> int:
    """serve.gpu_memory_utilization: the KV-cache blocks that fit on every rank after the weights, leaving room
    for a prefill's activations."""
    import torch

    from runtime.kvcache import BLOCK_SIZE, blocks_for, blocks_that_fit, sequence_blocks, sliding_layers

    if engine.device.type != "cuda":
        raise UserError("serve.gpu_memory_utilization sizes the KV cache from GPU memory; without a GPU set "
                        "serve.kv_cache_tokens or serve.max_batch (and drop serve.gpu_memory_utilization)")
    torch.cuda.empty_cache()  # what the allocator kept from loading is free for the cache
    free, total = torch.cuda.mem_get_info(engine.device)
    h = engine.hf_config
    # a chunk's activations, generously, and sampling over the rows (logits, probabilities, a sort: ~24 B a
    # vocabulary entry per row)
    reserve = max(1 << 30, 64 * sc.max_prefill_tokens * h.hidden_size) + 24 * sc.max_batch * h.vocab_size
    blocks = blocks_that_fit(total, total - free, sc.gpu_memory_utilization, reserve, per_block)
    everyone = distributed.gather_to_writer(blocks, layout)
    blocks = distributed.broadcast_object(min(everyone) if everyone is not None else None, layout)
    # one request of max_len, with its sliding layers' blocks while it is prefilled
    if blocks < sequence_blocks(blocks_for(sc.max_len), sliding_layers(engine.hf_config)[1], sc.max_prefill_tokens):
        raise UserError(f"serve.gpu_memory_utilization={sc.gpu_memory_utilization} leaves room for {blocks * BLOCK_SIZE} "
                        f"KV-cache tokens, less than one request of serve.max_len={sc.max_len} with its sliding-window "
                        f"layers' blocks while it is prefilled ({free / 2**30:.1f} GiB "
                        f"of {total / 2**30:.1f} GiB free after loading): raise it, or lower serve.max_len")
    if layout.is_writer:
        log.info("serve.gpu_memory_utilization=%s: %d KV-cache tokens fit (%.1f GiB free of %.1f GiB after the "
                 "weights)", sc.gpu_memory_utilization, blocks * BLOCK_SIZE, free / 2**30, total / 2**30)
    return blocks


def _render(job: Job) -> list[int]:
    return harmony.render_prompt(job.messages, reasoning_effort=job.effort, tools=job.tools or None)


def _announce(server: Any, sc: DictConfig, name: str, keyed: bool) -> None:
    """Log the URL and write endpoint.json (its existence says: up and answering)."""
    port = server.server_address[1]
    host = socket.gethostname() if sc.host in ("0.0.0.0", "::", "") else sc.host
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    url = f"http://{host}:{port}/v1"
    collect.write_json_atomic(Path(sc.out_dir) / "endpoint.json", {
        "url": url, "base_url": url, "health": f"http://{host}:{port}/health", "host": sc.host, "port": port,
        "hostname": socket.gethostname(), "model": name, "api_key_required": keyed, "pid": os.getpid(),
    })
    log.info("serving %s at %s (OpenAI base_url; POST /v1/responses, /v1/chat/completions)%s", name, url,
             "; API key required" if keyed else "")
    if sc.host in ("127.0.0.1", "localhost") and os.environ.get("SLURM_JOB_ID"):
        log.info("bound to %s on %s: from elsewhere, tunnel (ssh -N -L %d:127.0.0.1:%d %s) or restart with "
                 "serve.host=0.0.0.0 and an API key", sc.host, socket.gethostname(), port, port, socket.gethostname())


@hydra.main(config_path="../../conf", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    distributed.run_entry(lambda: run(cfg), log)


if __name__ == "__main__":
    main()
