"""Data: verifiable reasoning tasks, the R1-Zero template, tokenizers (and, later, grain pipelines)."""
