"""Known-harmless dependency noise stays off the console (stepwise.quiet), and nothing else does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepwise import quiet

# Each known message, emitted the way its library emits it, then stepwise's own warning and an
# unrelated library line with the same level, which must still reach the console.
SCRIPT = r"""
import logging, warnings
import stepwise.cli  # the CLI entry installs the filters on import
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type.")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
logging.getLogger("axolotl.utils.schemas.config").warning("Auto-enabling LoRA kernel optimizations for faster training.")
warnings.warn("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because offline", UserWarning)
warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`", DeprecationWarning)
logging.getLogger("transformers.tokenization_utils_tokenizers").warning("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer TokenizersBackend.")
logging.getLogger("lm_eval.evaluator").warning("pretrained=x appears to be an\n instruct or chat variant but chat\n template is not applied.")
import os
print("progress bars", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"), os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS"))
logging.getLogger("torchao").warning("KEEP torchao says something else")
logging.getLogger("other.lib").warning("KEEP Failed to load /y/thing.so")
warnings.warn("KEEP data.test_file reuses 3 ids of the input rows", UserWarning)
"""


def test_known_noise_is_filtered_and_everything_else_kept():
    proc = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    for noise in ("_C_mxfp8", "Enum subclass", "gemm_4bit_forward", "Auto-enabling LoRA", "publisher trust",
                  "script_method", "clean_up_tokenization_spaces", "chat template"):
        assert noise not in err, err
    assert err.count("KEEP") == 3, err  # other messages of the same loggers / categories pass
    assert "progress bars 1 1" in proc.stdout  # loading packaged weights / bundled benchmarks: no bars


def test_is_noise_matches_subprocess_lines_only_for_known_messages():
    assert quiet.is_noise("Failed to load /a/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
    assert quiet.is_noise("[axolotl.utils.schemas.config] Auto-enabling LoRA kernel optimizations for faster training.")
    assert not quiet.is_noise("{'loss': 3.25, 'grad_norm': 12.0, 'learning_rate': 0.0002, 'epoch': 0.5}")
    assert not quiet.is_noise("RuntimeError: CUDA out of memory")


@pytest.mark.slow
def test_real_imports_print_nothing_known():
    """The real libraries, imported the way the configs and eval stages import them."""
    code = ("import stepwise.cli\nimport torchao, bitsandbytes, peft, lm_eval\n"
            "from axolotl.utils.schemas.config import AxolotlInputConfig\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if quiet.is_noise(line)], proc.stderr[-3000:]
    for noise in ("Failed to load", "Enum subclass", "publisher trust"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_lm_evals_progress_bars_go_to_the_run_log_not_the_console(tmp_path, monkeypatch, capfd):
    """The forgetting eval calls lm-eval in process; its tqdm bars (building contexts, running
    requests) are lm-eval's own output: they land in `eval/forgetting/lm_eval.log`, the console gets
    stepwise's one line. lm-eval is a fake here that draws a bar the way lm-eval does (tqdm on stderr)."""
    import lm_eval
    import lm_eval.tasks
    from stepwise.evals.benchmarks import prepare_tasks
    from stepwise.evals.forgetting import evaluate_model
    from stepwise.evals.modelref import ModelRef
    from tqdm import tqdm

    tasks = prepare_tasks(["arc_easy"], 3, 0, tmp_path / "forgetting")
    bench = tasks[0].benchmark

    def fake_evaluate(**kw):
        for _ in tqdm(range(3), desc="Running loglikelihood requests"):
            pass
        samples = [{"doc_id": i, "filter": bench.filter, bench.metric: 1.0} for i in range(3)]
        return {"results": {bench.task: {f"{bench.metric},{bench.filter}": 1.0}}, "samples": {bench.task: samples}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: None)
    log = tmp_path / "forgetting" / "lm_eval.log"
    said: list[str] = []
    res = evaluate_model(ModelRef("hf", "base", path=tmp_path), tasks, tmp_path / "forgetting" / "tasks",
                         device="cpu", log=said.append, lm_eval_log=log)
    assert res[bench.name]["items"] == [1.0, 1.0, 1.0]
    out, err = capfd.readouterr()
    assert "Running loglikelihood requests" not in out + err, err
    assert "Running loglikelihood requests" in log.read_text() and "3/3" in log.read_text()
    assert len(said) == 1 and str(log) in said[0]  # stepwise's line says where lm-eval's output went
