"""stepwise: declarative Distilling Step-by-Step (teacher rationales -> curated data -> student)."""

__version__ = "0.1.0"
