"""runtime.bench on the tiny model (CPU): every field present and consistent, the recipe ran, results
gathered from every rank, tables appended, plots drawn; the bandwidth model against known numbers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from runtime import checkpoint, config, distributed, report, roofline
from runtime.bench import Bench, percentile, run
from tests.conftest import CPU, ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def bench(tmp_path: Path, *overrides: str) -> dict:
    cfg = config.compose("bench", [*CPU, "bench=quick", f"bench.out_dir={tmp_path}/run",
                                   f"bench.table={tmp_path}/table.csv", *overrides])
    return run(cfg)


def test_fields_are_present_and_consistent(tmp_path: Path) -> None:
    result = bench(tmp_path, "bench.baseline=true", "bench.batch_sizes=[1,3]", "bench.output_len=6")
    rows = result["rows"]
    assert [(r["impl"], r["batch_size"]) for r in rows] == [("ours", 1), ("ours", 3), ("baseline", 1), ("baseline", 3)]
    for r in rows:
        assert set(report.COLUMNS) <= set(r), set(report.COLUMNS) - set(r)
        assert r["generated_tokens"] == r["expected_tokens"] == r["runs"] * r["batch_size"] * 6
        assert r["output_tok_s_per_gpu"] == pytest.approx(r["output_tok_s"] / r["world_size"])
        assert r["output_tok_s"] == pytest.approx(r["batch_size"] * 6 / r["e2e_p50_s"])
        assert r["decode_tok_s"] == pytest.approx(r["batch_size"] / (r["tpot_p50_ms"] / 1e3))
        assert r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["tpot_p50_ms"] <= r["tpot_p99_ms"]
        assert r["prefill_tok_s"] == pytest.approx(r["batch_size"] * 32 / (r["ttft_p50_ms"] / 1e3))
        assert r["bw_fraction"] == pytest.approx(r["achieved_gb_s"] / r["copy_bw_gb_s"])
        assert r["achieved_gb_s"] == pytest.approx(r["step_bytes_gb"] / (r["tpot_p50_ms"] / 1e3))
        assert r["load_s"] > 0 and r["copy_bw_gb_s"] > 0
    ours, base = rows[:2], rows[2:]
    for o, b in zip(ours, base):
        assert o["speedup_vs_baseline"] == pytest.approx(o["output_tok_s"] / b["output_tok_s"])
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(on_disk["rows"]) == 4 and on_disk["versions"]["transformers"] and len(on_disk["ranks"]) == 1
    with (tmp_path / "run" / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    for png in ("pareto.png", "latency.png"):
        assert (tmp_path / "run" / png).read_bytes().startswith(PNG)


def test_offline_mode_runs_continuous_and_static_on_the_same_workload(tmp_path: Path, monkeypatch) -> None:
    """bench.mode=offline: drawn prompt/output lengths, EOS ignored, continuous batching against static rounds;
    every prompt generates exactly its drawn length in the continuous run (counted by wrapping QueueRun)."""
    from runtime import offline

    counted: list[int] = []
    tick = offline.QueueRun.tick

    def counting(self: offline.QueueRun) -> list:
        done = tick(self)
        counted.extend(len(f.tokens) for f in done)
        return done

    monkeypatch.setattr(offline.QueueRun, "tick", counting)
    result = bench(tmp_path, "bench.mode=offline", "bench.batch_sizes=[3]", "bench.num_prompts=7",
                   "bench.input_len=20", "bench.output_len=10", "bench.range_ratio=0.5")
    rows = result["rows"]
    assert [(r["impl"], r["mode"], r["batch_size"]) for r in rows] == [("continuous", "offline", 3),
                                                                        ("static", "offline", 3)]
    cfg = config.compose("bench", [*CPU, "bench.mode=offline", "bench.batch_sizes=[3]", "bench.num_prompts=7",
                                   "bench.input_len=20", "bench.output_len=10", "bench.range_ratio=0.5"])
    prompts, outs = Bench.offline_work(SimpleNamespace(b=cfg.bench))
    assert len(prompts) == 7 and all(10 <= len(p) <= 30 for p in prompts) and all(5 <= o <= 15 for o in outs)
    assert len(set(outs)) > 1  # lengths are drawn, not fixed
    assert sorted(counted[-7:]) == sorted(outs)  # the timed continuous run: each prompt its own length
    for r in rows:
        assert set(report.COLUMNS) <= set(r)
        assert r["generated_tokens"] == sum(outs)
        assert r["output_tok_s"] == pytest.approx(sum(outs) / r["e2e_p50_s"])
    assert rows[0]["speedup_vs_static"] == pytest.approx(rows[0]["output_tok_s"] / rows[1]["output_tok_s"])
    with pytest.raises(Exception, match="range_ratio"):
        bench(tmp_path, "bench.mode=offline", "bench.range_ratio=1.5")


def test_table_accumulates_and_replay_mode(tmp_path: Path) -> None:
    bench(tmp_path, "bench.batch_sizes=[2]", "bench.profile=true")
    prof = (tmp_path / "run" / "profile-b2.txt").read_text()  # where the time goes, prefill and whole run
    assert "## batch 2: prefill (1 new token)" in prof and "decode steps" in prof and "aten::" in prof
    result = bench(tmp_path, "bench.mode=replay", "bench.batch_sizes=[2]", "generation.max_new_tokens=5")
    (row,) = result["rows"]
    assert row["mode"] == "replay" and row["output_len"] == 5
    assert 0 < row["generated_tokens"] <= row["expected_tokens"]  # EOS honoured
    with (tmp_path / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["mode"] for t in table] == ["fixed", "replay"]


def test_multirun_sweep_gathers_every_rank(tmp_path: Path) -> None:
    """`--multirun parallel.tp_size=1,2` from one process: the tp=2 job re-runs itself under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.bench", "--multirun", "parallel.tp_size=1,2", *CPU, "bench=quick",
         "bench.batch_sizes=[2]", f"bench.table={tmp_path}/table.csv", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(t["tp_size"], t["world_size"]) for t in table] == [("1", "1"), ("2", "2")]
    two = table[1]
    assert float(two["output_tok_s_per_gpu"]) == pytest.approx(float(two["output_tok_s"]) / 2)
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]  # beside the table
    (one,) = [r for r in runs if r["layout"]["world_size"] == 1]
    (results,) = [r for r in runs if r["layout"]["world_size"] == 2]
    assert [rk["rank"] for rk in results["ranks"]] == [0, 1]  # every rank's numbers, gathered on rank 0
    full = one["ranks"][0]["param_bytes"]["attention"]
    assert all(full / 2 <= rk["param_bytes"]["attention"] <= full / 2 * 1.05 for rk in results["ranks"])


def test_percentile() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_roofline_reproduces_the_measured_bounds() -> None:
    """NOTES.md: 20b bf16 batch 1 reads 1.16 GB lm_head + 1.27 GB attention + 4.78 GB experts = 7.2 GB."""
    cfg = SimpleNamespace(**checkpoint.synthetic_config({}, "bf16"))
    one = roofline.decode_step_bytes(cfg, batch=1, context=1)
    assert one.attention / 1e9 == pytest.approx(1.27, abs=0.01)
    assert one.experts / 1e9 == pytest.approx(4.78, abs=0.01)
    assert one.total / 1e9 == pytest.approx(7.2, abs=0.03)
    assert roofline.expected_active_experts(32, 4, 8) == pytest.approx(21.0, abs=0.1)  # "about 20 of 32"
    assert roofline.expected_active_experts(32, 4, 64) == pytest.approx(32.0, abs=0.01)
    mx = roofline.decode_step_bytes(cfg, batch=1, context=1, expert_bytes=roofline.MXFP4_BYTES_PER_PARAM)
    assert mx.total / 1e9 == pytest.approx(3.7, abs=0.1)  # NOTES: ~3.7 GB with MXFP4 experts
    sharded = roofline.decode_step_bytes(cfg, batch=1, context=1, tp_size=2, ep_size=2)
    assert sharded.attention == pytest.approx(one.attention / 2) and sharded.experts == pytest.approx(one.experts / 4)
    vocab = roofline.decode_step_bytes(cfg, batch=1, context=1, tp_size=2, ep_size=2, vocab_split=4)
    lm_head = cfg.vocab_size * cfg.hidden_size * 2  # 1.16 GB, read by each rank in quarters (vocab parallel)
    assert sharded.other - vocab.other == pytest.approx(lm_head * 3 / 4)


def fake_bench(tp: int = 1, ep: int = 1, dp: int = 1) -> Bench:
    """A Bench whose rows can be assembled without a model: the tiny config, this layout."""
    b = Bench.__new__(Bench)
    b.cfg = config.compose("bench", [*CPU, "bench=quick"])
    b.b = b.cfg.bench
    b.layout = distributed.WorldLayout(tp * ep * dp, 0, 0, tp, ep, dp)
    b.engine = SimpleNamespace(dtype=torch.bfloat16, hf_config=SimpleNamespace(**checkpoint.synthetic_config(
        dict(b.cfg.model.arch), "bf16")))
    b.device, b.copy_bw, b.mxfp4 = torch.device("cpu"), 1e12, False
    b.vocab_split, b.all_reduce_path = tp * ep, "gloo" if tp * ep > 1 else "none"
    return b


def test_recipe_rows_count_one_replica_whatever_dp_size() -> None:
    """The recipe runs `batch` sequences over all ranks together (tp_plan="auto"); ours runs `batch` on
    each of dp_size replicas. Same timings: ours counts 2x the tokens, the recipe 1x."""
    bench = fake_bench(dp=2)
    timings = dict(prompts=[[1] * 10] * 4, new_tokens=5, ttft=[0.1], tpot=[0.01] * 4, e2e=[0.14],
                   generated=20, load_seconds=1.0)
    ours, recipe = bench._row("ours", 4, **timings), bench._row("baseline", 4, **timings)
    assert ours["output_tok_s"] == pytest.approx(2 * 4 * 5 / 0.14)
    assert ours["decode_tok_s"] == pytest.approx(2 * 4 / 0.01)
    assert ours["prefill_tok_s"] == pytest.approx(2 * 40 / 0.1)
    assert recipe["output_tok_s"] == pytest.approx(4 * 5 / 0.14)
    assert recipe["output_tok_s_per_gpu"] == pytest.approx(4 * 5 / 0.14 / 2)
    assert recipe["decode_tok_s"] == pytest.approx(4 / 0.01)
    assert recipe["prefill_tok_s"] == pytest.approx(40 / 0.1)


def test_recipe_tpot_divides_by_the_steps_generate_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay (EOS honoured): generate() runs until its longest row stops, so its time per step is
    (end-to-end - TTFT) / (that row's tokens - 1), not over the mean row's tokens."""
    import runtime.bench as rb

    stop, pad, width = 200002, 199999, 3
    rows = [[5, stop] + [pad] * 8, [5] * 9 + [stop]]  # 2 and 10 new tokens: 10 forwards

    def generate(ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: int) -> torch.Tensor:
        return torch.cat([ids, torch.tensor([r[:max_new_tokens] for r in rows])], dim=1)

    def timed(fn: object, device: torch.device) -> tuple[float, torch.Tensor]:
        out = fn()
        return 0.1 + 0.02 * (out.shape[1] - width - 1), out  # 100 ms to the first token, 20 ms a step

    bench = fake_bench()
    bench.engine.stop_ids, bench.engine.pad_id = {stop, pad}, pad
    bench.prompts = lambda batch: ([[1] * width] * batch, 10, False)
    monkeypatch.setattr(rb, "_timed", timed)
    row = bench._baseline_at(SimpleNamespace(generate=generate, device=torch.device("cpu")), 2, 1.0)
    assert row["generated_tokens"] == 12
    assert row["ttft_p50_ms"] == pytest.approx(100.0)
    assert row["tpot_p50_ms"] == pytest.approx(20.0)


def test_table_from_another_version_keeps_its_columns_aligned(tmp_path: Path) -> None:
    """A table written before decode_tok_s existed: new rows land under the right names, old rows keep theirs."""
    old_columns = [c for c in report.COLUMNS if c != "decode_tok_s"]
    table = tmp_path / "table.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns)
        w.writeheader()
        w.writerow({c: "" for c in old_columns} | {"run": "old", "output_tok_s_per_user": "20.0", "load_s": "6.3"})
    row = {c: None for c in report.COLUMNS} | {"impl": "ours", "output_tok_s_per_user": 250.0, "decode_tok_s": 8000.0,
                                               "load_s": 7.0}
    report.write(tmp_path / "new", {"rows": [row]}, table, plots=False)
    with table.open(newline="") as f:
        old, new = csv.DictReader(f)
    assert (new["run"], new["output_tok_s_per_user"], new["load_s"]) == ("new", "250.0", "7.0")  # was decode_tok_s
    assert new["decode_tok_s"] == "8000.0"
    assert (old["run"], old["output_tok_s_per_user"], old["load_s"], old["decode_tok_s"]) == ("old", "20.0", "6.3", "")


def test_plots_drawn_later_from_a_table(tmp_path: Path) -> None:
    """`python -m runtime.report TABLE OUT`: a GPU run's table (written with bench.plots=false) gets its plots on
    another machine, the latency plot from the run asked for (batch sizes as numbers, not as text); clear errors."""
    table = tmp_path / "table.csv"
    for run, tpot in (("a", 10.0), ("b", 20.0)):
        rows = [{c: None for c in report.COLUMNS} | {
            "impl": "ours", "model": "m", "mode": "serve", "batch_size": b, "output_tok_s_per_user": 1000 / (tpot * b),
            "output_tok_s_per_gpu": 100.0 * b, "tpot_p50_ms": tpot * b, "ttft_p50_ms": 5.0 * b} for b in (1, 8, 64)]
        report.write(tmp_path / run, {"rows": rows}, table, plots=False)
    report.main([str(table), str(tmp_path / "plots"), "--run", "a"])
    assert (tmp_path / "plots" / "pareto.png").stat().st_size > 0 and (tmp_path / "plots" / "latency.png").exists()
    typed = report._typed({"batch_size": "64", "tpot_p50_ms": "1.5", "impl": "ours", "ttft_p50_ms": ""})
    assert typed == {"batch_size": 64, "tpot_p50_ms": 1.5, "impl": "ours", "ttft_p50_ms": None}
    with pytest.raises(SystemExit, match="no rows of run 'c'"):
        report.main([str(table), "--run", "c"])
    with pytest.raises(SystemExit, match="no such results table"):
        report.main([str(tmp_path / "missing.csv")])


def test_pareto_curves_do_not_join_different_configurations() -> None:
    row = {c: "x" for c in report.COLUMNS}
    labels = {report.series_label(row | change) for change in
              ({}, {"experts": "triton"}, {"attention": "triton"}, {"output_len": "256"}, {"input_len": "64"},
               {"dtype": "float16"}, {"mode": "replay"})}
    assert len(labels) == 7
    assert report.series_label(row | {"run": "another"}) == report.series_label(row)  # same configuration


def test_multi_gpu_rows_are_scaled_against_one_gpu_rows_of_the_same_work() -> None:
    """speedup_vs_1gpu / scaling_efficiency: against the newest one-GPU row (this run's or the table's) of the
    same model, kernels, lengths and batch; none where the table has no such row."""
    base = {"impl": "ours", "plan": "ours", "model": "gpt-oss-120b", "format": "mxfp4", "dtype": "bfloat16",
            "attention": "triton", "experts": "mxfp4", "mode": "fixed", "input_len": 1024.0, "output_len": 128}
    table = [{**{k: str(v) for k, v in base.items()}, "world_size": "1", "batch_size": "1", "decode_tok_s": "250.0"},
             {**{k: str(v) for k, v in base.items()}, "world_size": "1", "batch_size": "1", "decode_tok_s": "267.6"}]
    rows = [{**base, "world_size": 2, "batch_size": 1, "decode_tok_s": 296.1},
            {**base, "world_size": 2, "batch_size": 8, "decode_tok_s": 1074.6},
            {**base, "world_size": 2, "batch_size": 1, "decode_tok_s": 280.0, "experts": "grouped_mm"}]
    report.add_scaling(rows, table)
    assert rows[0]["speedup_vs_1gpu"] == pytest.approx(296.1 / 267.6)
    assert rows[0]["scaling_efficiency"] == pytest.approx(296.1 / 267.6 / 2)
    assert rows[1]["speedup_vs_1gpu"] is None and rows[2]["scaling_efficiency"] is None
