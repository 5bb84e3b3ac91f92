"""Processes and clusters: the stage chain (pipeline.py), SLURM submission (slurm.py), the console view
(progress.py) and the post-chain report (report.py). Nothing here trains; every step is `training.train`."""
