"""Processes and clusters: pipeline runner, SLURM submission, torchrun helpers (arrive with the pipeline issue)."""
