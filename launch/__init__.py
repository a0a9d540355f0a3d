"""One entry for local, multi-process (jax.distributed), TPU-pod and SLURM runs: `python -m launch.run`."""
