"""Every config option composes, overrides work, typos and wrong types are errors, every field is documented."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from launcher import config as launcher_config
from runtime import config
from runtime.errors import UserError

GROUPS = ["model", "parallel", "attention", "experts", "generation", "prompts", "output"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group: str) -> None:
    options = sorted(p.stem for p in (config.CONF_DIR / group).glob("*.yaml"))
    assert options, group
    for option in options:
        extra = ["prompts.path=x.jsonl"] if (group, option) == ("prompts", "jsonl") else []
        cfg = config.compose("generate", [f"{group}={option}", *extra])
        assert cfg[group] is not None


def test_defaults_and_overrides() -> None:
    cfg = config.compose("generate", [])
    assert cfg.model.name == "tiny" and cfg.model.synthetic
    assert (cfg.parallel.tp_size, cfg.parallel.ep_size, cfg.parallel.dp_size) == (1, 1, 1)
    cfg = config.compose(
        "generate",
        ["model=gpt-oss-120b", "model.path=/ckpt", "parallel.tp_size=2", "parallel.ep_size=2",
         "generation.max_new_tokens=512", "generation.batch_size=32", "generation.reasoning_effort=low"],
    )
    assert cfg.model.name == "gpt-oss-120b" and cfg.model.path == "/ckpt"
    assert cfg.model.arch.num_hidden_layers == 36 and cfg.model.arch.num_local_experts == 128
    assert cfg.parallel.tp_size * cfg.parallel.ep_size == 4
    assert cfg.generation.max_new_tokens == 512 and cfg.generation.reasoning_effort == "low"
    assert "${" not in cfg.output.path  # resolved: the timestamp is fixed once


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match="max_new_token"):
        config.compose("generate", ["generation.max_new_token=3"])
    with pytest.raises(UserError, match="max_new_token"):
        config.compose("generate", ["+generation.max_new_token=3"])


def test_wrong_type_is_an_error() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        config.compose("generate", ["parallel.tp_size=two"])


def test_synth_config() -> None:
    cfg = config.compose("synth", ["synth.out=/tmp/x", "synth.format=bf16"])
    assert cfg.model.name == "gpt-oss-20b" and cfg.synth.format == "bf16"


def test_serve_config() -> None:
    cfg = config.compose("serve", ["parallel.tp_size=2", "serve.port=0", "serve.max_batch=4", "serve.host=0.0.0.0"])
    assert cfg.serve.port == 0 and cfg.serve.max_batch == 4 and cfg.serve.host == "0.0.0.0"
    assert cfg.serve.host and "${" not in cfg.serve.out_dir
    assert cfg.generation.do_sample  # requests without temperature sample, as OpenAI's API does
    assert "prompts" not in cfg and "output" not in cfg
    with pytest.raises(ConfigCompositionException, match="max_batchs"):
        config.compose("serve", ["serve.max_batchs=4"])
    with pytest.raises(UserError, match="serve.nope"):
        config.compose("serve", ["+serve.nope=1"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        config.compose("serve", ["serve.port=eighty"])


def _dataclasses(module) -> list[type]:  # noqa: ANN001
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass)
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__]


@pytest.mark.parametrize("module", [config, launcher_config], ids=["runtime", "launcher"])
def test_every_field_has_a_docstring(module) -> None:  # noqa: ANN001
    tree = ast.parse(Path(module.__file__).read_text())
    documented: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            body = node.body
            names = set()
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    names.add(a.target.id)  # type: ignore[attr-defined]
            documented[node.name] = names
    roots = {"GenerateJobConfig", "SynthJobConfig", "BenchJobConfig", "ServeJobConfig"}  # group containers: each group is documented
    checked = 0
    for cls in _dataclasses(module):
        if cls.__name__ in roots:
            continue
        missing = {f.name for f in dataclasses.fields(cls)} - documented[cls.__name__]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
        checked += 1
    assert checked >= 2
