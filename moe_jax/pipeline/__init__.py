"""Graphs of runs and DeepSeek-R1's multi-stage pipeline: the executor every graph runs on
(`executor`: steps keyed by their config's identity and their inputs, skipped, resumed or redone)
and its generic step kinds (`steps`), the R1 graph declared on it (`r1.run_pipeline`), which
problems each stage poses (`prompts`), its datasets (`datasets`, `rejection`), and the results
table over stages and seeds (`report`, `seeds`)."""
