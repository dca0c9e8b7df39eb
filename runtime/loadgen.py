"""The serving benchmark (`python -m runtime.bench bench.mode=serve`): requests over HTTP to an
OpenAI-compatible server, timed token by token, at each concurrency.

    python -m runtime.bench bench.mode=serve 'bench.concurrency=[1,4]'            # tiny model, CPU, seconds
    python -m runtime.bench bench.mode=serve model=gpt-oss-20b model.path=... attention=triton experts=mxfp4 \\
        generation.compile=true 'bench.concurrency=[1,8,64,256]' bench.input_len=1024 bench.output_len=1024
    python -m runtime.bench bench.mode=serve bench.url=http://host:8000/v1 ...    # any other server

Without `bench.url` it starts ours (`runtime.serve`, under torchrun when the layout has several ranks)
with this job's model, layout, kernels and generation settings, waits until it answers, measures, and
stops it. Each request is a `POST /v1/completions` of random token ids (`input_len`), streamed, with
`max_tokens` = `output_len` and vLLM's `ignore_eos`, so lengths are as drawn on any weights; greedy.
Per measurement, in vLLM's names: TTFT (first text), TPOT ((end - first) / (tokens - 1)), ITL (between
streamed chunks), E2EL, as mean / median / p99; output, total and request throughput; goodput under the
`bench.goodput` objectives. Rows go to the same results.json / CSV / table / plots as the other modes
(batch_size = concurrency; tokens/s per user = 1000 / mean TPOT).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runtime import config, report
from runtime.errors import UserError

log = logging.getLogger("runtime.bench")

START_SECONDS = 1800.0
"""How long the started server may take to answer (a 120b load and warm-up included): a failure guard."""
REQUEST_SECONDS = 3600.0
"""Socket timeout of one request (a stalled server fails the request, not the benchmark)."""
VOCAB_TEXT_IDS = 199_998
"""Prompt ids are drawn below this: o200k's ordinary tokens, no special ones."""
SERVER_GROUPS = ("model", "parallel", "attention", "experts", "generation")


@dataclass
class Result:
    """One request's timings (seconds, from its send) and sizes."""

    input_len: int
    output_len: int = 0
    """Tokens generated (the server's usage; else the chunks counted)."""
    ttft: float | None = None
    e2el: float | None = None
    chunks: list[float] = field(default_factory=list)
    """Arrival time of every streamed chunk with a choice (vLLM's client counts these)."""
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens the server took from its prefix cache (its usage's cached_tokens; 0 if not reported)."""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2el is None or self.output_len < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)


class Endpoint:
    """An OpenAI-compatible base URL (http://host:port/v1) and the model id to name."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None) -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UserError(f"bench.url={base_url!r}: give the server's base URL, e.g. http://127.0.0.1:8000/v1")
        self.https = url.scheme == "https"
        try:
            self.host, self.port = url.hostname, url.port or (443 if self.https else 80)
        except ValueError as e:
            raise UserError(f"bench.url={base_url!r}: {e}") from None
        self.path = url.path or ""
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model = model or self._first_model()

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _first_model(self) -> str:
        conn = self.connect(60)
        try:
            conn.request("GET", self.path + "/models", headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                hint = "" if self.path.endswith("/v1") else " (OpenAI base URLs end in /v1)"
                raise UserError(f"GET {self.path}/models answered {resp.status}: {body[:300]!r}; check bench.url"
                                f"{hint}, set bench.served_model, and $OPENAI_API_KEY if it needs a key")
            return json.loads(body)["data"][0]["id"]
        except (KeyError, IndexError, TypeError, ValueError):
            raise UserError(f"GET {self.path}/models did not list a model: set bench.served_model") from None
        except OSError as e:
            raise UserError(f"cannot reach {self.host}:{self.port} ({e}): is the server up at bench.url?") from None
        finally:
            conn.close()

    def complete(self, prompt: list[int], max_tokens: int) -> Result:
        """One streamed completion, timed."""
        res = Result(len(prompt))
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
        conn = self.connect(REQUEST_SECONDS)
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.path + "/completions", body=body, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
                return res
            usage, done = None, False
            while True:
                line = resp.readline()
                now = time.perf_counter() - t0
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:300]
                    return res
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):  # as vLLM's client: every chunk with a choice, the finish one too
                    res.chunks.append(now)
                    res.ttft = res.chunks[0]
            if not done:
                res.error = "the stream ended before [DONE]"
            elif not res.chunks:
                res.error = "the stream carried no completion"
            res.e2el = res.chunks[-1] if res.chunks else None
            res.output_len = int(usage["completion_tokens"]) if usage else len(res.chunks)
            details = (usage or {}).get("prompt_tokens_details") or {}
            res.cached_tokens = int(details.get("cached_tokens") or 0)
        except (OSError, ValueError, http.client.HTTPException) as e:
            res.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        return res


def draw_lengths(n: int, input_len: int, output_len: int, ratio: float, seed: int,
                 prefix_len: int = 0) -> list[tuple[list[int], int]]:
    """n (prompt ids, output length): lengths uniform in [len (1 - ratio), len (1 + ratio)], ids random text
    tokens (no special ones); every prompt starts with the same `prefix_len` random ids (then its own)."""
    if not 0 <= ratio < 1:
        raise UserError(f"bench.range_ratio={ratio}: use a value in [0, 1)")
    if prefix_len < 0:
        raise UserError(f"bench.prefix_len={prefix_len}: give shared prompt tokens >= 0")
    rng = random.Random(seed)
    prefix = [rng.randrange(VOCAB_TEXT_IDS) for _ in range(prefix_len)]

    def length(mean: int) -> int:
        return rng.randint(max(1, int(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio))))

    return [(prefix + [rng.randrange(VOCAB_TEXT_IDS) for _ in range(length(input_len))], length(output_len))
            for _ in range(n)]


def client_processes(setting: int, concurrency: int) -> int:
    """Processes that share a point's requests: `setting`, lowered to the largest that divides the concurrency (each
    process gets an equal share of the streams)."""
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise UserError(f"bench.client_processes={setting!r}: give a number of client processes >= 1")
    n = min(setting, concurrency)
    while concurrency % n:
        n -= 1
    return n


def _send_all(endpoint: Endpoint, work: list[tuple[list[int], int]], concurrency: int, rate: float | None,
              seed: int, start_at: float | None = None) -> tuple[list[Result], float, float]:
    """One process's share: the requests over `concurrency` threads, the first sent at wall-clock `start_at` (if
    given); (results in order, wall-clock time of the first send and of the last answer)."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    rng = random.Random(seed)
    pool = ThreadPoolExecutor(concurrency)
    try:
        t0, start = time.perf_counter(), time.time()
        futures = []
        due = 0.0
        for prompt, out_len in work:
            if rate:
                due += rng.expovariate(rate)
                time.sleep(max(0.0, t0 + due - time.perf_counter()))
            futures.append(pool.submit(endpoint.complete, prompt, out_len))
        results = [f.result() for f in futures]
        return results, start, start + time.perf_counter() - t0
    finally:  # on Ctrl-C or a stop: the requests not started yet are dropped, not run
        pool.shutdown(wait=False, cancel_futures=True)


CLIENT_START_SECONDS = 300.0
"""How long spawned client processes may take to start (each imports the bench's modules): a failure guard."""


def run_point(endpoint: Endpoint, work: list[tuple[list[int], int]], concurrency: int, rate: float | None,
              seed: int, processes: int = 1) -> tuple[list[Result], float]:
    """All requests of `work`, at most `concurrency` in flight, sent at `rate` per second (Poisson) or at
    once; (results in order, seconds from the first send to the last answer).

    With `processes` > 1 (lowered by `client_processes` to a divisor of the concurrency) the requests are dealt out round robin to that
    many client processes (spawned), each with an equal share of the concurrency and of the rate (Poisson
    arrivals split at random stay Poisson), all starting at one wall-clock time once every process has started:
    for servers faster than one Python process can read token by token (on the development machine one process
    read 512 streams at 15,400 tok/s with ITLs at the server's pace, docs/benchmarks.md), so that the client is
    not what is measured. A request waits for a slot of its own process, not of any."""
    processes = client_processes(processes, concurrency)
    if processes == 1:
        results, start, end = _send_all(endpoint, work, concurrency, rate, seed)
        return results, end - start
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    started = ctx.Barrier(processes + 1)
    pool = ctx.Pool(processes, initializer=started.wait)  # each process waits here once its imports are done
    try:
        started.wait(CLIENT_START_SECONDS)
        start_at = time.time() + 0.1  # (the shares' hand-over)
        parts = pool.starmap(_send_all, [(endpoint, work[p::processes], concurrency // processes,
                                          rate / processes if rate else None, seed + p, start_at)
                                         for p in range(processes)], chunksize=1)
    except BaseException:  # Ctrl-C, a stop, a client that could not start: the clients go too
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
    results: list[Result | None] = [None] * len(work)
    for p, (part, _, _) in enumerate(parts):
        results[p::processes] = part
    return results, max(end for _, _, end in parts) - min(start for _, start, _ in parts)  # type: ignore[return-value]


def _stats(values: list[float], name: str, scale: float = 1000.0) -> dict[str, float | None]:
    from runtime.bench import percentile

    if not values:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    return {f"mean_{name}_ms": scale * sum(values) / len(values), f"median_{name}_ms": scale * percentile(values, 50),
            f"p99_{name}_ms": scale * percentile(values, 99)}


def objectives(goodput: Any) -> dict[str, float]:
    """bench.goodput's objectives that are set, checked."""
    slo = {k: float(v) for k, v in dict(goodput).items() if v is not None}
    for k, v in slo.items():
        if k not in ("ttft", "tpot", "e2el") or not v > 0:
            raise UserError(f"bench.goodput.{k}={v}: objectives are ttft, tpot and e2el, in ms > 0")
    return slo


def metrics(results: list[Result], duration: float, slo: dict[str, float]) -> dict[str, Any]:
    """vLLM's serving metrics over one measurement."""
    ok = [r for r in results if r.error is None and r.ttft is not None]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    m: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **_stats([r.ttft for r in ok if r.ttft is not None], "ttft"),
        **_stats([t for r in ok if (t := r.tpot) is not None], "tpot"),
        **_stats(itl, "itl"),
        **_stats([r.e2el for r in ok if r.e2el is not None], "e2el"),
    }
    if slo:
        def meets(r: Result) -> bool:
            got = {"ttft": r.ttft, "tpot": r.tpot if r.output_len > 1 else 0.0, "e2el": r.e2el}  # vLLM's rule
            return all(got[k] is not None and 1000 * got[k] <= v for k, v in slo.items())  # type: ignore[operator]
        m["goodput"] = sum(meets(r) for r in ok) / duration
    else:
        m["goodput"] = None
    return m


def checkpoint_format(cfg: DictConfig) -> str:
    """`mxfp4` or `bf16`: the experts' format of the checkpoint the server loads."""
    from runtime import checkpoint

    if cfg.model.path:
        return "mxfp4" if checkpoint.is_mxfp4(checkpoint.read_config(checkpoint.resolve_path(cfg.model.path))) else "bf16"
    return str(cfg.model.synthetic_format)


def row(cfg: DictConfig, m: dict[str, Any], concurrency: int, world: int, impl: str) -> dict[str, Any]:
    """A results-table row (report.COLUMNS) for one measurement."""
    n = max(m["completed"], 1)
    tpot = m["mean_tpot_ms"]
    return {
        "impl": impl, "model": cfg.model.name, "format": checkpoint_format(cfg) if impl == "ours" else "",
        "dtype": cfg.model.dtype, "world_size": world, "tp_size": cfg.parallel.tp_size,
        "ep_size": cfg.parallel.ep_size, "dp_size": cfg.parallel.dp_size, "plan": cfg.parallel.get("plan", "ours"),
        "all_reduce": cfg.parallel.get("all_reduce"), "attention": cfg.attention.implementation,
        "experts": cfg.experts.implementation, "mode": "serve", "batch_size": concurrency,
        "input_len": m["total_input_tokens"] / n, "output_len": m["total_output_tokens"] / n, "runs": m["completed"],
        "generated_tokens": m["total_output_tokens"],
        "ttft_p50_ms": m["median_ttft_ms"], "ttft_p99_ms": m["p99_ttft_ms"],
        "tpot_p50_ms": m["median_tpot_ms"], "tpot_p99_ms": m["p99_tpot_ms"],
        "e2e_p50_s": m["median_e2el_ms"] / 1000 if m["median_e2el_ms"] is not None else None, "output_tok_s": m["output_throughput"],
        "output_tok_s_per_gpu": m["output_throughput"] / world, "decode_tok_s": m["output_throughput"],
        "output_tok_s_per_user": 1000 / tpot if tpot else None,
        "request_rate": cfg.bench.request_rate, "request_throughput": m["request_throughput"],
        "total_tok_s": m["total_token_throughput"], "ttft_mean_ms": m["mean_ttft_ms"],
        "tpot_mean_ms": tpot, "itl_mean_ms": m["mean_itl_ms"], "itl_p50_ms": m["median_itl_ms"],
        "itl_p99_ms": m["p99_itl_ms"], "e2el_mean_ms": m["mean_e2el_ms"], "e2el_p99_ms": m["p99_e2el_ms"],
        "goodput": m["goodput"], "failed": m["failed"],
    }


# ------------------------------------------------------------------------------------------ our server


def _override(key: str, value: Any) -> str:
    """key=value as a Hydra command-line override (strings quoted)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{fmt(x)}" for k, x in v.items()) + "}"
        # Hydra reads a backslash as an escape only before a quote or at the end of the string
        text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(v))
        return "'" + text.replace("'", "\\'") + "'"
    return f"{key}={fmt(value)}"


def server_command(cfg: DictConfig, out_dir: Path, max_len: int, max_batch: int, waiting: int,
                   model_name: str | None = None) -> list[str]:
    """`runtime.serve` with this job's model, layout, kernels and generation settings (every field, so the
    server runs exactly what the bench was given), under torchrun when it has several ranks."""
    groups = OmegaConf.to_container(cfg, resolve=True)
    overrides = [_override(f"{g}.{k}", v) for g in SERVER_GROUPS for k, v in groups[g].items()]  # type: ignore[index, union-attr]
    overrides += ["serve.port=0", _override("serve.out_dir", str(out_dir)), f"serve.max_len={max_len}",
                  f"serve.max_batch={max_batch}", f"serve.max_waiting={max(waiting, 1024)}",
                  f"serve.max_connections={max(2 * max_batch, 1024)}", f"serve.max_prefill_tokens={max(max_len, 8192)}",
                  "serve.api_key=null", _override("serve.model_name", model_name)]
    world = cfg.parallel.tp_size * cfg.parallel.ep_size * cfg.parallel.dp_size
    if world > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                "-m", "runtime.serve", *overrides]
    return [sys.executable, "-m", "runtime.serve", *overrides]


class OurServer:
    """runtime.serve started for the benchmark, answering once endpoint.json exists; stopped by SIGTERM."""

    def __init__(self, cmd: list[str], out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = out_dir / "server.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GPTOSS_API_KEY"):
            env.pop(var, None)
        endpoint = out_dir / "endpoint.json"
        endpoint.unlink(missing_ok=True)  # a reused out_dir: an earlier server's address is not this one's
        log.info("starting the server: %s", " ".join(cmd))
        with open(self.log_path, "wb") as sink:
            self.proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + START_SECONDS
            while not endpoint.is_file():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise UserError(f"the server did not come up (exit {self.proc.poll()}); its log "
                                    f"{self.log_path} ends:\n{tail}")
                time.sleep(0.2)
            self.info = json.loads(endpoint.read_text())
        except BaseException:  # Ctrl-C or a stop while it loads: it must not keep the GPUs
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            pid = getattr(self, "info", {}).get("pid", self.proc.pid)
            try:
                os.kill(pid, signal.SIGTERM)  # rank 0 stops every rank
                self.proc.wait(timeout=120)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------ entry


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run()'s finally, which stops the server


def run(cfg: DictConfig) -> dict[str, Any]:
    """Measure every concurrency; write results like the other bench modes and return them."""
    b = cfg.bench
    concurrency = [int(c) for c in b.concurrency]
    if not concurrency or min(concurrency) < 1:
        raise UserError(f"bench.concurrency={list(concurrency)}: give request counts >= 1, e.g. [1,8,64]")
    if b.input_len < 1 or b.output_len < 2:
        raise UserError("bench.mode=serve needs bench.input_len >= 1 and bench.output_len >= 2")
    slo = objectives(b.goodput)
    if b.request_rate is not None and not b.request_rate > 0:
        raise UserError(f"bench.request_rate={b.request_rate}: give requests per second > 0, or null for all at once")
    if b.num_prompts is not None and b.num_prompts < 1:
        raise UserError(f"bench.num_prompts={b.num_prompts}: give at least 1 request per concurrency, or null")
    client_processes(b.client_processes, 1)  # a bad setting fails before a server starts
    if b.baseline or b.profile:
        log.warning("bench.mode=serve measures a server over HTTP: bench.baseline and bench.profile do not apply")
    out_dir = Path(b.out_dir or report.default_dir(cfg))
    world = cfg.parallel.tp_size * cfg.parallel.ep_size * cfg.parallel.dp_size
    points = {c: draw_lengths(b.num_prompts or max(4 * c, 8), b.input_len, b.output_len, b.range_ratio, b.seed + c,
                              b.prefix_len) for c in concurrency}
    # warm-up requests of their own (another shared prefix too): a server with a prefix cache must not see
    # the measured prompts first
    warm = {c: draw_lengths(min(c, len(points[c])), b.input_len, b.output_len, b.range_ratio, b.seed + 10_000 + c,
                            b.prefix_len) for c in concurrency}
    longest = max(len(p) + n for work in [*points.values(), *warm.values()] for p, n in work)
    server = None
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a killed bench still stops its server
    rows, per_point = [], []
    try:
        if b.url:
            endpoint = Endpoint(b.url, b.served_model, os.environ.get("OPENAI_API_KEY"))
            impl = "url"
        else:
            cmd = server_command(cfg, out_dir / "server", longest + 8, max(concurrency),
                                 max(len(w) for w in points.values()), b.served_model)
            server = OurServer(cmd, out_dir / "server")
            endpoint = Endpoint(server.info["base_url"], server.info["model"])
            impl = "ours"
        for c in concurrency:
            work = points[c]
            procs = client_processes(b.client_processes, c)
            if b.warmup > 0:  # compilation, graph capture and autotuning for these shapes happen here, untimed
                run_point(endpoint, warm[c], c, None, b.seed, procs)
            results, duration = run_point(endpoint, work, c, b.request_rate, b.seed, procs)
            m = metrics(results, duration, slo)
            errors = [r.error for r in results if r.error]
            if errors:
                log.warning("concurrency %d: %d of %d requests failed, e.g. %s", c, len(errors), len(results), errors[0])
            per_point.append({"concurrency": c, "client_processes": procs, **m})
            rows.append(row(cfg, m, c, world, impl))
            log.info("serve concurrency %4d: %8.1f output tok/s  %.2f req/s  TTFT %7.1f ms  TPOT %6.2f ms  "
                     "ITL %6.2f ms (median; %d client process%s)%s", c, m["output_throughput"], m["request_throughput"],
                     m["median_ttft_ms"] or float("nan"), m["median_tpot_ms"] or float("nan"),
                     m["median_itl_ms"] or float("nan"), procs, "" if procs == 1 else "es",
                     f"  {m['total_cached_tokens']} of {m['total_input_tokens']} prompt tokens cached" if b.prefix_len else "")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
    from runtime.generate import versions

    result = {"command": sys.argv, "config": config.to_container(cfg), "endpoint": b.url or endpoint.host,
              "model": endpoint.model, "versions": versions(), "points": per_point, "rows": rows}
    report.write(out_dir, result, Path(b.table), plots=b.plots)
    log.info("results in %s (table %s)", out_dir, b.table)
    return result
