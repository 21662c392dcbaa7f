"""Curation: teacher responses -> trusted train/val/test files with a funnel; export to chat JSONL.

`stepwise.curation.curate.run_curate` and `stepwise.curation.export.run_export` are the two stages; the steps live
in small modules (validate, filters, dedup + minhash, splits, contamination, balance, mixing).
`stepwise.review.stage` (Argilla) belongs to the review stage.
"""
