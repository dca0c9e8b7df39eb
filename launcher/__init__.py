"""Start a runtime job on this machine (torchrun) or on a Slurm cluster (sbatch). Never imports torch."""
