"""Known-harmless third-party noise, kept off the user's console (hand-written; uses only the
standard `warnings` and `logging` modules).

The stepwise process imports torch, torchao, bitsandbytes, Axolotl (to validate configs) and lm-eval
(in-process forgetting evals). On import or first use they print messages that are about their own
optional pieces, not about the user's run: torchao's CUDA-only `.so` files that a CPU box cannot
load, torch's pytree deprecation for enums that torchao registers, bitsandbytes' kernel-hub lookup
in offline mode, Axolotl's "Auto-enabling LoRA kernel optimizations" (stepwise's CPU profile turns
them off again before training), transformers' BPE clean-up notice for the packaged tokenizer,
lm-eval's chat-template advice (the benchmarks are scored without one on purpose), and the progress
bars of loading packaged weights and building the bundled benchmark files. Each entry below names the logger or warning and the exact message,
so anything else, stepwise's own warnings included, still reaches the console.

The Axolotl train/preprocess subprocesses never write to the console: `stepwise.training.launcher`
sends their whole output to `train/<config>/{preprocess,train}.log` in the run directory, and
`is_noise()` is the same list for any caller that echoes such lines.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (logger name, message regex): messages logged through the standard logging module
NOISY_LOGS: tuple[tuple[str, str], ...] = (
    ("torchao", r"Failed to load .*\.so"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile"),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("axolotl.utils.schemas.config", r"Auto-enabling LoRA kernel optimizations"),
    # the packaged SmolLM2 tokenizer's config; decoding is not cleaned up either way
    ("transformers.tokenization_utils_tokenizers", r"Ignoring clean_up_tokenization_spaces=True for BPE tokenizer"),
    # the forgetting benchmarks are scored by loglikelihood without a chat template on purpose, the
    # same way before and after training
    ("lm_eval.evaluator", r"chat variant but chat\s+template is not applied"),
)

# Progress bars of loading packaged weights and building the bundled benchmark files (offline, each
# well under a second); set to 0 in the environment to see them again.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

# (category, message regex): Python warnings from dependencies
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"Skipping publisher trust check for 'kernels-community/"),
    (UserWarning, r"Position ids are not supported for parameter efficient tuning"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    (DeprecationWarning, r"'click\.utils\.get_(binary|text)_stream' is deprecated"),
    (DeprecationWarning, r"Importing from 'distilabel\.llms' is deprecated"),
    (FutureWarning, r"`torch\.utils\._pytree\._register_pytree_node` is deprecated"),
    (Warning, r".*The 'default' attribute with value"),  # pydantic field metadata in dependencies
)

_LINE = re.compile("|".join(f"(?:{msg})" for _, msg in NOISY_LOGS)
                   + "|" + "|".join(f"(?:{msg})" for _, msg in NOISY_WARNINGS))


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge: let it through
            return True
        return not self.pattern.search(text)


_installed = False


def install() -> None:
    """Filter the known-harmless messages in this process (idempotent). Called by the CLI entry
    point before any heavy library is imported."""
    global _installed
    if _installed:
        return
    _installed = True
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # read when transformers / datasets are imported, later
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message if message.startswith(".*") else f".*{message}",
                                category=category)
    for name, message in NOISY_LOGS:
        # a filter on the logger that creates the record: the same message from any other logger passes
        logging.getLogger(name).addFilter(_DropKnown(message))


def is_noise(line: str) -> bool:
    """True for a console line that is one of the known-harmless messages above."""
    return bool(_LINE.search(line))
