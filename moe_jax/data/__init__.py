"""Data: verifiable reasoning tasks, the R1-Zero template, tokenizers, grain pipelines and dataset
records on disk (JSON Lines / ArrayRecord)."""
