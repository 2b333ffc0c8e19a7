"""Ablation sweeps: any experiment × config axes × seeds, launched locally or on SLURM, resumable,
aggregated into tables with confidence intervals and plots (`experiments/sweep.py`)."""
