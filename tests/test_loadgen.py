"""The serving benchmark (`runtime.bench bench.mode=serve`): our server started and stopped by it on the
tiny model (CPU), another running server measured through `bench.url`, and the metrics' arithmetic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from runtime import config, loadgen, report
from runtime.errors import UserError
from tests.conftest import CPU
from tests.serve_server import torchrun_server

PNG = b"\x89PNG\r\n\x1a\n"
FIELDS = ("completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens", "request_throughput",
          "output_throughput", "total_token_throughput", "total_cached_tokens", "goodput",
          *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p99")))


def serve_bench(tmp_path: Path, *overrides: str) -> dict:
    cfg = config.compose("bench", [*CPU, "bench.mode=serve", "bench.input_len=24", "bench.output_len=6",
                                   f"bench.out_dir={tmp_path}/run", f"bench.table={tmp_path}/table.csv", *overrides])
    return loadgen.run(cfg)


def test_our_server_at_two_concurrencies(tmp_path: Path) -> None:
    """The bench starts runtime.serve with its own model settings, sends fixed-length requests (ignore_eos) at
    each concurrency, writes rows like the other modes, and stops the server."""
    result = serve_bench(tmp_path, "bench.concurrency=[1,3]", "bench.num_prompts=6", "bench.goodput.ttft=1e9")
    assert [p["concurrency"] for p in result["points"]] == [1, 3]
    for p in result["points"]:
        assert set(FIELDS) <= set(p), set(FIELDS) - set(p)
        assert (p["completed"], p["failed"]) == (6, 0)
        assert (p["total_input_tokens"], p["total_output_tokens"]) == (6 * 24, 6 * 6)  # lengths exactly as asked
        assert p["output_throughput"] == pytest.approx(36 / p["duration_s"])
        assert p["request_throughput"] == pytest.approx(6 / p["duration_s"]) == pytest.approx(p["goodput"])
        assert 0 < p["median_ttft_ms"] <= p["median_e2el_ms"] and p["median_ttft_ms"] <= p["p99_ttft_ms"]
        assert p["median_itl_ms"] >= 0 and p["median_tpot_ms"] >= 0  # >= : the server may send tokens together
    for r in result["rows"]:
        assert set(report.COLUMNS) <= set(r), set(report.COLUMNS) - set(r)
        assert (r["mode"], r["impl"], r["runs"], r["input_len"], r["output_len"]) == ("serve", "ours", 6, 24, 6)
        assert r["output_tok_s_per_user"] == pytest.approx(1000 / r["tpot_mean_ms"])
    with (tmp_path / "table.csv").open() as f:
        assert [(t["mode"], t["batch_size"]) for t in csv.DictReader(f)] == [("serve", "1"), ("serve", "3")]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "results.json").read_text())["model"] == "tiny"
    assert (run_dir / "pareto.png").read_bytes().startswith(PNG)
    server_log = (run_dir / "server" / "server.log").read_text()
    assert "stopped:" in server_log  # it ran, then left on SIGTERM
    saved = (run_dir / "server" / "config.yaml").read_text()
    assert "max_batch: 3" in saved and "max_len: 38" in saved  # sized from the benchmark's requests


def test_a_shared_prefix_is_taken_from_the_prefix_cache(tmp_path: Path) -> None:
    """bench.prefix_len: every prompt starts with the same random tokens; one at a time, each request after
    the first finds them in our server's prefix cache, and the point counts what its usage reported."""
    drawn = loadgen.draw_lengths(3, 24, 6, 0.0, 7, prefix_len=40)
    assert all(ids[:40] == drawn[0][0][:40] and len(ids) == 64 for ids, _ in drawn)
    assert drawn[0][0][40:] != drawn[1][0][40:]
    result = serve_bench(tmp_path, "bench.concurrency=[1]", "bench.num_prompts=4", "bench.prefix_len=40")
    (p,) = result["points"]
    assert (p["completed"], p["total_input_tokens"]) == (4, 4 * 64)
    assert p["total_cached_tokens"] == 3 * 32  # the 40 shared tokens' 2 whole blocks of 16


def test_another_server_through_its_url(tmp_path: Path) -> None:
    """bench.url: a server already running (here ours, 2 ranks, tensor parallel) measured as any OpenAI-
    compatible endpoint; sampled lengths (range_ratio) arrive as drawn; a request rate; an unmet objective."""
    with torchrun_server(tmp_path, 2, ["parallel.tp_size=2", "serve.max_len=256"]) as server:
        result = serve_bench(tmp_path, f"bench.url={server.base_url}", "bench.concurrency=[2]",
                             "bench.num_prompts=5", "bench.range_ratio=0.5", "bench.request_rate=50",
                             "bench.goodput.ttft=0.000001", "parallel.tp_size=2", "bench.warmup=0")
    (p,) = result["points"]
    drawn = loadgen.draw_lengths(5, 24, 6, 0.5, 0 + 2)
    assert (p["completed"], p["failed"]) == (5, 0)
    assert p["total_input_tokens"] == sum(len(ids) for ids, _ in drawn)
    assert p["total_output_tokens"] == sum(n for _, n in drawn)
    assert p["goodput"] == 0
    (r,) = result["rows"]
    assert r["impl"] == "url" and r["world_size"] == 2 and r["output_tok_s_per_gpu"] == pytest.approx(r["output_tok_s"] / 2)


def test_client_processes_share_a_point(tmp_path: Path) -> None:
    """bench.client_processes=2: the requests dealt out to two client processes (spawned) with half the concurrency
    each, started together; every request is answered once, in order, with its own lengths, as with one process;
    never more processes than the concurrency, and a number that divides it."""
    assert loadgen.client_processes(3, 2) == 2 and loadgen.client_processes(4, 512) == 4
    assert loadgen.client_processes(2, 3) == 1 and loadgen.client_processes(4, 6) == 3
    with torchrun_server(tmp_path, 1, ["serve.max_len=256", "serve.max_batch=4"]) as server:
        endpoint = loadgen.Endpoint(server.base_url)
        work = loadgen.draw_lengths(7, 24, 6, 0.5, 3)
        results, duration = loadgen.run_point(endpoint, work, 4, None, 0, processes=2)
        alone, _ = loadgen.run_point(endpoint, work, 4, None, 0, processes=1)
        odd, _ = loadgen.run_point(endpoint, work, 3, None, 0, processes=2)  # 3 streams: one process (a divisor)
    assert [r.error for r in results] == [None] * 7 and duration > 0
    assert [(r.input_len, r.output_len) for r in results] == [(len(ids), n) for ids, n in work]
    assert [(r.input_len, r.output_len) for r in alone] == [(r.input_len, r.output_len) for r in results]
    assert [(r.input_len, r.output_len) for r in odd] == [(r.input_len, r.output_len) for r in results]
    assert all(len(r.chunks) >= 1 and r.ttft is not None and 0 < r.ttft <= r.e2el <= duration for r in results)


def test_metrics_arithmetic() -> None:
    a = loadgen.Result(10, output_len=4, ttft=0.1, e2el=0.4, chunks=[0.1, 0.2, 0.3, 0.4])
    b = loadgen.Result(20, output_len=3, ttft=0.2, e2el=1.2, chunks=[0.2, 0.7, 1.2])
    failed = loadgen.Result(5, error="HTTP 503")
    m = loadgen.metrics([a, b, failed], duration=2.0, slo={"ttft": 150, "tpot": 600})
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 7)
    assert m["output_throughput"] == 3.5 and m["total_token_throughput"] == 18.5 and m["request_throughput"] == 1.0
    assert m["mean_tpot_ms"] == pytest.approx((100 + 500) / 2)  # (e2el - ttft) / (tokens - 1)
    assert m["median_itl_ms"] == pytest.approx(100) and m["mean_itl_ms"] == pytest.approx(1300 / 5)
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["p99_e2el_ms"] == pytest.approx(400 + 0.99 * 800)
    assert m["goodput"] == 0.5  # a meets both objectives; b's TTFT (200 ms) misses 150


@pytest.mark.parametrize(("overrides", "match"), [
    (["bench.concurrency=[0]"], "concurrency"),
    (["bench.range_ratio=1.5"], "range_ratio"),
    (["bench.request_rate=0"], "request_rate"),
    (["bench.url=ftp://x"], "bench.url"),
    (["bench.url=http://127.0.0.1:9/v1"], "cannot reach"),
    (["bench.goodput.ttft=-5"], "objectives"),
    (["bench.num_prompts=0"], "num_prompts"),
    (["bench.prefix_len=-1"], "prefix_len"),
    (["bench.url=http://127.0.0.1:9"], "cannot reach"),
    (["bench.client_processes=0"], "client_processes"),
])
def test_bad_settings_are_named(tmp_path: Path, overrides: list[str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        serve_bench(tmp_path, *overrides)


def test_a_server_that_cannot_start_is_reported(tmp_path: Path) -> None:
    """Requests longer than the model's positions: the server refuses its serve.max_len and exits; the bench
    says so with the end of the server's log (and leaves nothing running)."""
    with pytest.raises(UserError, match="did not come up(.|\n)*exceeds the model's 131072 positions"):
        serve_bench(tmp_path, "bench.concurrency=[1]", "bench.num_prompts=1", "bench.input_len=131072")
