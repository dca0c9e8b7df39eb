"""Write a gpt-oss checkpoint with random weights in the exact real layout, to test and benchmark
the real loading path without the 13-65 GB download.

    python -m runtime.synth model=gpt-oss-20b synth.out=/data/gpt-oss-20b-synth              # MXFP4, ~13 GB
    python -m runtime.synth model=gpt-oss-120b synth.out=/data/120b synth.format=bf16
    python -m runtime.synth model=tiny synth.out=/tmp/tiny model.arch.num_hidden_layers=2

The result loads with `model.path=DIR` here and with transformers' `from_pretrained(DIR)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from runtime import checkpoint, config  # noqa: F401  (config registers the schemas)
from runtime.errors import UserError, exit_on_user_error

log = logging.getLogger("runtime.synth")


@hydra.main(config_path="../conf", config_name="synth", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = cfg.synth
    with exit_on_user_error(log):
        config.check_schema(cfg, config.SynthJobConfig)
        if not 0 <= s.seed < 2**63:
            raise UserError(f"synth.seed={s.seed} must be in [0, 2**63)")
        if s.max_shard_bytes < 1:
            raise UserError(f"synth.max_shard_bytes={s.max_shard_bytes} must be >= 1 (bytes per safetensors shard)")
        if Path(s.out).exists() and not Path(s.out).is_dir():
            raise UserError(f"synth.out={s.out} is a file: name a directory (new, or empty)")
        hf = checkpoint.synthetic_config(OmegaConf.to_container(cfg.model.arch), s.format)
        out = checkpoint.write_synthetic(Path(s.out), hf, s.format, seed=s.seed, max_shard_bytes=s.max_shard_bytes)
    log.info("wrote %s (%s, %d layers, %d experts)", out, s.format, hf["num_hidden_layers"], hf["num_local_experts"])


if __name__ == "__main__":
    main()
