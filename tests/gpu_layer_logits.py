"""Run under torchrun on GPUs (tests/test_gpu_multi.py): the synthetic gpt-oss-20b's logits through one
decoder layer at a time (a sliding and a full one), bf16, with the layout and kernels given as Hydra
overrides on the command line; rank 0 saves them to $LOGITS_OUT (a torch file: {layer: logits})."""

from __future__ import annotations

import os
import sys

import torch

from runtime import Engine, compose, distributed


def layer_logits(overrides: list[str]) -> dict[int, torch.Tensor]:
    eng = Engine(compose("generate", ["model=gpt-oss-20b", f"model.path={os.environ['GPTOSS_SYNTH_20B']}",
                                      "model.device=cuda", *overrides]))
    m = eng.model
    layers, types = m.model.layers, list(m.config.layer_types)
    ids = torch.randint(0, 199_998, (4, 300), generator=torch.Generator().manual_seed(0)).cuda()
    out = {}
    for i in (0, 1):
        m.model.layers = layers[i : i + 1]
        m.config.layer_types, m.config.num_hidden_layers = [types[i]], 1
        with torch.no_grad():
            out[i] = m(ids, use_cache=False).logits.float().cpu()
    eng.close()
    return out


def main() -> None:
    out = layer_logits(sys.argv[1:])
    if distributed.env_world()[1] == 0:
        torch.save(out, os.environ["LOGITS_OUT"])
        print("OK", flush=True)
    distributed.finish(0)


if __name__ == "__main__":
    main()
