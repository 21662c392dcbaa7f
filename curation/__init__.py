"""Curation: teacher responses -> trusted train/val/test files with a funnel; export to chat JSONL.

`curation.curate.run_curate` and `curation.export.run_export` are the two stages; the steps live
in small modules (validate, filters, dedup + minhash, splits, contamination, balance, mixing).
`curation.review` (Argilla) belongs to the review stage.
"""
