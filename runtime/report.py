"""Benchmark results on disk: one JSON and one CSV per run, rows appended to a results table, and the
plots engines publish (throughput per GPU vs tokens/s per user; latency vs batch size).

The plots can be drawn later from a results table (a GPU run with bench.plots=false, or a machine without
matplotlib): `python -m runtime.report TABLE [OUT_DIR] [--run RUN]` writes pareto.png (every run in the table)
and latency.png (RUN's rows; default: the table's last run) into OUT_DIR (default: beside the table)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

COLUMNS = [
    "run", "impl", "model", "format", "dtype", "world_size", "tp_size", "ep_size", "dp_size", "plan", "all_reduce",
    "attention", "experts", "mode", "batch_size", "input_len", "output_len", "runs", "generated_tokens", "expected_tokens",
    "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_s", "output_tok_s", "output_tok_s_per_gpu", "decode_tok_s",
    "output_tok_s_per_user", "prefill_tok_s", "load_s", "step_bytes_gb", "achieved_gb_s", "copy_bw_gb_s",
    "bw_fraction", "peak_mem_gib", "speedup_vs_baseline", "ttft_ratio_vs_baseline", "speedup_vs_1gpu",
    "scaling_efficiency",
    # bench.mode=serve (runtime/loadgen.py): batch_size is the concurrency
    "request_rate", "request_throughput", "total_tok_s", "ttft_mean_ms", "tpot_mean_ms", "itl_mean_ms", "itl_p50_ms",
    "itl_p99_ms", "e2el_mean_ms", "e2el_p99_ms", "goodput", "failed",
    # bench.mode=offline: continuous batching's output tok/s over static rounds' (the same workload)
    "speedup_vs_static",
]

SAME_WORK = ("impl", "plan", "model", "format", "dtype", "attention", "experts", "mode", "batch_size", "input_len",
             "output_len")
"""What a one-GPU row must share with a multi-GPU row to be its scaling reference."""


def default_dir(cfg: DictConfig) -> Path:
    """<directory of bench.table>/<time>-<model>-tp<t>ep<e>dp<d>."""
    p = cfg.parallel
    name = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{cfg.model.name}-tp{p.tp_size}ep{p.ep_size}dp{p.dp_size}"
    return Path(cfg.bench.table).parent / name


def add_ratios(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """Ours over the recipe at the same batch size: output tokens/s ratio (the headline) and TTFT ratio."""
    base = {r["batch_size"]: r for r in baseline}
    for r in rows:
        b = base.get(r["batch_size"])
        r["speedup_vs_baseline"] = r["output_tok_s"] / b["output_tok_s"] if b else None
        r["ttft_ratio_vs_baseline"] = b["ttft_p50_ms"] / r["ttft_p50_ms"] if b else None
    for b in baseline:
        b["speedup_vs_baseline"], b["ttft_ratio_vs_baseline"] = 1.0, 1.0


def add_scaling(rows: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> None:
    """Each multi-GPU row against the newest one-GPU row of the same work (SAME_WORK) in this run or the
    table: decode tok/s over the one GPU's (speedup_vs_1gpu) and that over the GPU count
    (scaling_efficiency, 1.0 = linear). Rows with no such reference keep them empty."""
    def work(r: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(r.get(k) or ("ours" if k == "plan" else "")) for k in SAME_WORK)  # older tables: no plan

    ref: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in [*earlier, *rows]:  # later rows win
        if str(r.get("world_size")) == "1":
            ref[work(r)] = r
    for r in rows:
        r.setdefault("speedup_vs_1gpu", None)
        r.setdefault("scaling_efficiency", None)
        one = ref.get(work(r))
        world = int(r.get("world_size") or 1)
        key = "decode_tok_s" if r.get("decode_tok_s") not in (None, "") else "output_tok_s"  # offline: no steps
        if world > 1 and one is not None and one.get(key) not in (None, "") and float(one[key]) > 0:
            r["speedup_vs_1gpu"] = float(r[key]) / float(one[key])
            r["scaling_efficiency"] = r["speedup_vs_1gpu"] / world


def write(out_dir: Path, result: dict[str, Any], table: Path, plots: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = out_dir.name
    for r in result["rows"]:
        r["run"] = run_id
        for column in COLUMNS:  # a mode's rows leave the other modes' columns empty
            r.setdefault(column, None)
    add_scaling(result["rows"], _read_csv(table) if table.exists() and table.stat().st_size else [])
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    _write_csv(out_dir / "results.csv", result["rows"], append=False)
    table.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(table, result["rows"], append=True)
    if plots:
        draw(out_dir, result["rows"], _read_csv(table))


def _write_csv(path: Path, rows: list[dict[str, Any]], append: bool) -> None:
    """Write `rows` (COLUMNS), or append them. A table whose header is not COLUMNS (written by another
    version) is rewritten under COLUMNS plus its own extra columns, so every row stays under its names."""
    new = not (append and path.exists() and path.stat().st_size)
    fields = COLUMNS
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            old = _read_csv(path)
            fields = COLUMNS + [c for c in header if c not in COLUMNS]
            rows, append, new = old + list(rows), False, True
    with path.open("a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def series_label(r: dict[str, Any]) -> str:
    """One Pareto curve per configuration: implementations and lengths too, so runs that differ only in
    attention/experts/dtype or prompt/output length are not joined into one line."""
    return (f"{r['impl']} {r['model']} {r['format']} {r['dtype']} {r['attention']}/{r['experts']} "
            f"tp{r['tp_size']}ep{r['ep_size']}dp{r['dp_size']}{'' if r.get('plan', 'ours') == 'ours' else ' ' + str(r['plan'])} {r['mode']} in{r['input_len']} out{r['output_len']}")


def draw(out_dir: Path, rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> None:
    """pareto.png (every run in the table) and latency.png (this run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in table:
        if r.get("output_tok_s_per_user") in (None, "") or r.get("output_tok_s_per_gpu") in (None, ""):
            continue  # a measurement with no completed request has no point to draw
        label = series_label(r)
        series.setdefault(label, []).append(
            (float(r["output_tok_s_per_user"]), float(r["output_tok_s_per_gpu"]), r["batch_size"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, b in pts:
            ax.annotate(f"b{b}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title("throughput per GPU vs speed per user")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in sorted({r["impl"] for r in rows}):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in mine]
        nan = float("nan")  # a measurement with no completed request
        axes[0].plot(bs, [nan if r["tpot_p50_ms"] is None else r["tpot_p50_ms"] for r in mine], marker="o", label=impl)
        axes[1].plot(bs, [nan if r["ttft_p50_ms"] is None else r["ttft_p50_ms"] for r in mine], marker="o", label=impl)
    for ax, what in zip(axes, ("time per output token p50 (ms)", "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=120)
    plt.close(fig)


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from a CSV with its numbers as numbers and its empty cells as None (as `write` had them)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v in (None, ""):
            out[k] = None
            continue
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runtime.report", description="Draw a results table's plots.")
    ap.add_argument("table", type=Path, help="a results table (bench.table) or a run's results.csv")
    ap.add_argument("out_dir", type=Path, nargs="?", help="where the PNGs go (default: the table's folder)")
    ap.add_argument("--run", help="the run whose rows latency.png shows (default: the table's last run)")
    args = ap.parse_args(argv)
    if not args.table.is_file():
        raise SystemExit(f"{args.table}: no such results table (bench.table, or a run's results.csv)")
    table = [_typed(r) for r in _read_csv(args.table)]
    if not table:
        raise SystemExit(f"{args.table}: the table has no rows")
    run = args.run or table[-1]["run"]
    rows = [r for r in table if str(r["run"]) == str(run)]
    if not rows:
        raise SystemExit(f"{args.table}: no rows of run {run!r}; runs: {sorted({str(r['run']) for r in table})}")
    out_dir = args.out_dir or args.table.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    draw(out_dir, rows, table)
    print(f"{out_dir / 'pareto.png'} ({len(table)} rows), {out_dir / 'latency.png'} (run {run})")


if __name__ == "__main__":
    main()
