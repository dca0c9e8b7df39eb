"""Every bad setting is refused before any weight is read, with a message that names the fix."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime import checkpoint, distributed, model
from runtime.errors import UserError
from tests.conftest import generate

GPT_OSS_20B = SimpleNamespace(
    num_attention_heads=64, num_key_value_heads=8, num_local_experts=32, intermediate_size=2880, model_type="gpt_oss"
)


def test_world_size_product() -> None:
    with pytest.raises(UserError, match=r"tp\(2\) \* ep\(2\) \* dp\(1\) = 4 != world size 8"):
        distributed.make_layout(2, 2, 1, world=(8, 0, 0))
    with pytest.raises(UserError, match=r"launch 2 processes"):
        distributed.make_layout(2, 1, 1, world=(1, 0, 0))
    with pytest.raises(UserError, match="must be >= 1"):
        distributed.make_layout(0, 1, 1, world=(1, 0, 0))


def test_layout_coordinates() -> None:
    # rank = (dp * ep + ep_rank) * tp + tp_rank
    lay = distributed.make_layout(2, 2, 2, world=(8, 7, 3))
    assert (lay.dp_rank, lay.ep_rank, lay.tp_rank) == (1, 1, 1)
    lay = distributed.make_layout(2, 2, 2, world=(8, 4, 0))
    assert (lay.dp_rank, lay.ep_rank, lay.tp_rank, lay.is_replica_leader) == (1, 0, 0, True)
    assert not distributed.make_layout(2, 2, 2, world=(8, 5, 1)).is_replica_leader


def test_tp_must_divide_heads() -> None:
    lay = distributed.make_layout(3, 1, 1, world=(3, 0, 0))
    with pytest.raises(UserError, match=r"tp_size=3 must divide the 8 KV heads and 64 query heads.*\[1, 2, 4, 8\]"):
        distributed.validate_for_model(lay, GPT_OSS_20B)
    lay = distributed.make_layout(16, 1, 1, world=(16, 0, 0))
    with pytest.raises(UserError, match="8 KV heads"):
        distributed.validate_for_model(lay, GPT_OSS_20B)
    distributed.validate_for_model(distributed.make_layout(8, 4, 1, world=(32, 0, 0)), GPT_OSS_20B)


def test_ep_must_divide_experts() -> None:
    lay = distributed.make_layout(1, 3, 1, world=(3, 0, 0))
    with pytest.raises(UserError, match=r"ep_size=3 must divide the 32 experts"):
        distributed.validate_for_model(lay, GPT_OSS_20B)


def test_hub_kernel_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"LOCAL_KERNELS='kernels-community/vllm-flash-attn3=/path"):
        model.check_kernels("kernels-community/vllm-flash-attn3", False, "grouped_mm")
    try:
        import kernels  # noqa: F401

        ok = contextlib.nullcontext()
    except ImportError:  # without the package a local copy is not enough either, and we say so
        ok = pytest.raises(UserError, match="needs the `kernels` package")
    monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/vllm-flash-attn3={tmp_path}")
    with ok:
        model.check_kernels("kernels-community/vllm-flash-attn3", False, "grouped_mm")  # a local copy is enough
    monkeypatch.delenv("LOCAL_KERNELS")
    (tmp_path / "models--kernels-community--vllm-flash-attn3").mkdir()
    with ok:
        model.check_kernels("kernels-community/vllm-flash-attn3", False, "grouped_mm")  # so is a cached one
    with pytest.raises(UserError, match="experts.implementation='fast'"):
        model.check_kernels("eager", False, "fast")


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.resolve_path(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        checkpoint.resolve_path(str(tmp_path))
    with pytest.raises(UserError, match="model.path is not set"):
        checkpoint.resolve_path(None)


def test_hub_id_offline_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="hub could not provide it.*model.synthetic=true"):
        checkpoint.resolve_path("openai/gpt-oss-20b-not-cached-here")


def test_bad_run_fails_before_loading(tmp_path: Path) -> None:
    """A wrong degree, a bad prompts line or a bad generation value stops the run before the model loads."""
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: not valid JSON"):
        generate([f"prompts.path={bad}", f"output.path={tmp_path}/o.jsonl"])
    with pytest.raises(UserError, match=r"world size 1"):
        generate(["parallel.tp_size=2", f"output.path={tmp_path}/o.jsonl"])
    with pytest.raises(UserError, match="top_p"):
        generate(["generation.top_p=0", f"output.path={tmp_path}/o.jsonl"])
    with pytest.raises(UserError, match="model.path=/definitely/missing does not exist"):
        generate(["model=gpt-oss-20b", "model.path=/definitely/missing", f"output.path={tmp_path}/o.jsonl"])
    assert not (tmp_path / "o.jsonl").exists()
    # an output file that cannot be resumed, or a directory: said before the weights (a missing path here)
    (tmp_path / "o.jsonl").write_text("not a record\n")
    for out, match in ((tmp_path / "o.jsonl", "o.jsonl:1 is not a record"), (tmp_path, "is a directory")):
        with pytest.raises(UserError, match=match):
            generate(["model=gpt-oss-20b", "model.path=/definitely/missing", f"output.path={out}"])
    assert (tmp_path / "o.jsonl").read_text() == "not a record\n"


def test_flash_kernel_needs_the_dynamic_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/vllm-flash-attn3={tmp_path}")
    with pytest.raises(UserError, match="generation.kv_cache=dynamic"):
        generate(["attention=vllm-flash-attn3", f"output.path={tmp_path}/o.jsonl"])


def test_serve_refuses_before_loading(tmp_path: Path) -> None:
    """What the server cannot do is said before any weight is read, and a taken port too."""
    import socket

    from runtime import config
    from runtime.serve.__main__ import run

    def serve(*overrides: str) -> None:
        run(config.compose("serve", ["model.device=cpu", f"serve.out_dir={tmp_path}", *overrides]))

    with pytest.raises(UserError, match="parallel.dp_size=2: a server runs one model replica"):
        serve("parallel.dp_size=2")
    with pytest.raises(UserError, match="both size the KV cache: set one"):
        serve("serve.kv_cache_tokens=100000", "serve.gpu_memory_utilization=0.9")
    with pytest.raises(UserError, match="own paged KV cache"):
        serve("generation.kv_cache=dynamic")
    with pytest.raises(UserError, match="serve.kv_cache_tokens=100 cannot hold one request of serve.max_len=512"):
        serve("serve.kv_cache_tokens=100", "serve.max_len=512")
    with pytest.raises(UserError, match="serve.max_batch=0 must be >= 1"):
        serve("serve.max_batch=0")
    with pytest.raises(UserError, match=r"serve.gpu_memory_utilization=1.5: give a fraction"):
        serve("serve.gpu_memory_utilization=1.5")
    with pytest.raises(UserError, match="with model.device=cpu set serve.kv_cache_tokens or serve.max_batch"):
        serve("serve.gpu_memory_utilization=0.9")
    with pytest.raises(UserError, match="serve.max_len=200000 exceeds the model's 131072 positions"):
        serve("serve.max_len=200000")
    with pytest.raises(UserError, match="serve.timeout_seconds=10000000000.0 must be between 0 and 86400"):
        serve("serve.timeout_seconds=1e10")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(UserError, match="serve.out_dir=.*a_file is a file"):
        run(config.compose("serve", ["model.device=cpu", f"serve.out_dir={a_file}"]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match=rf"cannot listen on 127.0.0.1:{taken.getsockname()[1]}.*serve.port"):
            serve(f"serve.port={taken.getsockname()[1]}")


def test_transformers_plan_layouts_and_kernels() -> None:
    """parallel.plan=transformers runs the recipe's own sharding: one mesh over all ranks, its kernels."""
    check = model.check_transformers_plan
    check(distributed.make_layout(2, 1, 1, world=(2, 0, 0)), "eager", "grouped_mm")
    check(distributed.make_layout(1, 2, 1, world=(2, 0, 0)), "eager", "grouped_mm")
    with pytest.raises(UserError, match="parallel.dp_size=1"):
        check(distributed.make_layout(1, 1, 2, world=(2, 0, 0)), "eager", "grouped_mm")
    with pytest.raises(UserError, match="tp x ep mix needs parallel.plan=ours"):
        check(distributed.make_layout(2, 2, 1, world=(4, 0, 0)), "eager", "grouped_mm")
    with pytest.raises(UserError, match="attention=eager experts=grouped_mm"):
        check(distributed.make_layout(2, 1, 1, world=(2, 0, 0)), "triton", "mxfp4")


@pytest.mark.parametrize(("override", "match"), [
    ("parallel.plan=megatron", "parallel.plan='megatron': use ours or transformers"),
    ("parallel.all_reduce=custom", r"parallel.all_reduce='custom': use one of \['auto', 'one_shot', 'nccl'\]"),
])
def test_parallel_choices_are_checked(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        generate([override, f"output.path={tmp_path / 'out.jsonl'}"])


@pytest.mark.parametrize(("overrides", "match"), [
    (["model.arch.num_key_value_heads=0"], "model.arch.num_key_value_heads=0 must be a whole number >= 1"),
    (["model.arch.num_hidden_layers=-1"], "model.arch.num_hidden_layers=-1 must be a whole number >= 1"),
    (["model.arch.head_dim=15"], "model.arch.head_dim=15 must be even"),
    (["model.name=../../escaped"], "model.name='../../escaped' names the synthetic checkpoint's cache directory"),
    (["generation.seed=99999999999999999999"], r"generation.seed=99999999999999999999 must be in \[0, 2\*\*63\)"),
    (["parallel.backend=bogus"], "parallel.backend='bogus': use auto, nccl or gloo"),
])
def test_config_values_found_by_the_audit(tmp_path: Path, overrides: list[str], match: str) -> None:
    """Values a hostile-input audit found accepted and then crashing with a traceback (or writing outside the
    cache): each is one clear error before any weight is read."""
    with pytest.raises(UserError, match=match):
        generate([*overrides, f"output.path={tmp_path / 'o.jsonl'}"])


def test_prompts_file_is_not_the_output_file(tmp_path: Path) -> None:
    """Both the same file: the prompts were read as finished records ("0 to generate", exit 0)."""
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    with pytest.raises(UserError, match="prompts.path and output.path are the same file"):
        generate([f"prompts.path={same}", f"output.path={same}"])
    assert same.read_text() == json.dumps({"id": "a", "prompt": "hi"}) + "\n"


@pytest.mark.parametrize(("override", "match"), [
    ("bench.warmup=-5", "bench.warmup=-5 must be >= 0"),
    ("bench.batch_sizes=[2,2]", "give each batch size once"),
    ("bench.input_len=140000", "exceeds the model's 131072 positions"),
    ("bench.table=''", "name a CSV file"),
    ("bench.seed=-1", "bench.seed=-1 must be in"),
])
def test_bench_values_are_checked_before_measuring(tmp_path: Path, override: str, match: str) -> None:
    from runtime import config
    from runtime.bench import run

    with pytest.raises(UserError, match=match):
        run(config.compose("bench", ["model.device=cpu", "bench=quick", f"bench.out_dir={tmp_path}", override]))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(UserError, match="is a file: name a directory"):
        run(config.compose("bench", ["model.device=cpu", "bench=quick", f"bench.out_dir={a_file}"]))
