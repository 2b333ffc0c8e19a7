"""Training: the run driver (`driver`) every kind of run goes through, the workdir format
(`workdir`), run configs and their tree (`experiment_config`, `config_tree`), losses, the
optimizer, the jitted step with its objective as a parameter (`step`), checkpoints, metrics,
progress and evaluation; `trainer` is the language-model run (pretraining and SFT)."""
