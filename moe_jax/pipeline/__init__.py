"""DeepSeek-R1's multi-stage pipeline as a graph of ordinary runs (`r1.run_pipeline`): stages keyed
by their config and inputs (`stages`), their datasets (`datasets`, `rejection`), and the results
table over stages and seeds (`report`, `seeds`)."""
