"""`training.unsloth`: the keys Axolotl 0.19 uses for its Unsloth integration, checked by Axolotl's own
schema and ours, and the planner's lower memory. (Training with them needs a GPU; not run here.)"""

from __future__ import annotations

import pytest
from stepwise.training.backends import check_config, generate_configs
from stepwise.training.configgen import UNSLOTH_KEYS, apply_cpu_profile, write_configs
from stepwise.training.shapes import resolve_shape
from stepwise.training.testing import make_run, write_recipe
from stepwise.training.vram import PlanInput, estimate, offloaded_bytes
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.recipe import RecipeError, load_recipe

SMALL = "micro_batch_size: 2\ngradient_accumulation_steps: 2\n"


def _generate(tmp_path, extra: str):
    recipe, run_dir = make_run(tmp_path, extra)
    configs = generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)
    return configs, write_configs(configs, tmp_path / "configs")


def test_unsloth_configs_pass_axolotl_and_our_checks(tmp_path):
    configs, paths = _generate(tmp_path, "unsloth: true\n" + SMALL)
    by_mod = {c.modality: (c, p) for c, p in zip(configs, paths, strict=True)}
    full = by_mod["full"][0].config
    assert not any(k in full for k in (*UNSLOTH_KEYS, "activation_offloading"))  # LoRA/QLoRA only
    for modality in ("lora", "qlora"):
        gc, path = by_mod[modality]
        assert {k: gc.config[k] for k in UNSLOTH_KEYS} == {"lora_mlp_kernel": True, "lora_qkv_kernel": True,
                                                          "lora_o_kernel": True}
        assert gc.config["activation_offloading"] == "legacy" and gc.config["gradient_checkpointing"] is True
        assert not any(k.startswith("unsloth_") for k in gc.config)  # removed in Axolotl 0.19
        text = path.read_text()
        assert "# Unsloth (training.unsloth): fused LoRA kernels" in text and "held in CPU RAM" in text
        report = check_config(path, base_dir=tmp_path)
        assert report.ok and report.axolotl_validated, [p.format(report.label) for p in report.problems]
    # the planner line in the header is the Unsloth estimate
    lora = by_mod["lora"][0]
    assert lora.estimate.plan.unsloth and f"Planner: peak ~{lora.estimate.total_gb:.2f} GB" in by_mod["lora"][1].read_text()


def test_without_checkpointing_no_offloading(tmp_path):
    configs, paths = _generate(tmp_path, "unsloth: true\nmodality: lora\ngradient_checkpointing: false\n" + SMALL)
    (gc,), (path,) = configs, paths
    assert gc.config["lora_mlp_kernel"] is True and "activation_offloading" not in gc.config
    assert check_config(path, base_dir=tmp_path).ok


def test_axolotl_rejects_the_old_unsloth_keys(tmp_path):
    """Why we emit the kernel keys: Axolotl 0.19's schema refuses `unsloth_*`."""
    configs, paths = _generate(tmp_path, "modality: lora\n" + SMALL)
    path = paths[0]
    path.write_text(path.read_text() + "unsloth_lora_mlp: true\nunsloth_rope: true\n")
    report = check_config(path, base_dir=tmp_path)
    assert not report.ok
    text = " ".join(p.message for p in report.problems)
    assert "unsloth_lora_mlp" in text and "lora_mlp_kernel" in text


def test_cpu_profile_turns_unsloth_off(tmp_path):
    configs, paths = _generate(tmp_path, "unsloth: true\nmodality: qlora\n" + SMALL)
    cfg = configs[0].config
    cpu = apply_cpu_profile(cfg)
    assert "activation_offloading" not in cpu and not any(cpu[k] for k in UNSLOTH_KEYS)
    report = check_config({**cpu, "activation_offloading": "legacy"}, profile="cpu", base_dir=tmp_path)
    assert any(p.key == "activation_offloading" and p.level == "error" for p in report.problems)


def test_recipe_allows_unsloth_only_for_axolotl_lora(tmp_path):
    for bad in ("unsloth: true\nmodality: full\n", "unsloth: true\nbackend: openai\n"):
        with pytest.raises(RecipeError, match="unsloth"):
            load_recipe(write_recipe(tmp_path, bad))


@pytest.mark.parametrize("modality", ["lora", "qlora"])
def test_planner_counts_unsloths_lower_memory(modality):
    shape = resolve_shape("llama-7b")
    plain = PlanInput(modality=modality, sequence_len=8192, micro_batch_size=2, optimizer="adamw_torch")
    fast = plain.model_copy(update={"unsloth": True})
    a, b = estimate(shape, plain), estimate(shape, fast)
    assert b.total_gb < a.total_gb
    for part in ("weights", "adapters", "gradients", "optimizer", "logits"):
        assert a.parts[part] == b.parts[part]  # only activations move
    saved = a.parts["activations"] - b.parts["activations"]
    off = offloaded_bytes(shape, fast)
    assert off == shape.num_layers * 8192 * 2 * shape.hidden_size * 2  # every layer's bf16 input
    assert off - 2 * 8192 * 2 * shape.hidden_size * 2 <= saved  # all but ~2 layer inputs leave the GPU
    assert any("unsloth" in n for n in b.notes)
    # the saving grows with the sequence: small at 512 tokens, where the weights dominate
    short = estimate(shape, plain.model_copy(update={"sequence_len": 512}))
    short_fast = estimate(shape, fast.model_copy(update={"sequence_len": 512}))
    assert 0 < short.total_gb - short_fast.total_gb < (a.total_gb - b.total_gb) / 8
    # full fine-tuning is unaffected
    full = PlanInput(modality="full", unsloth=True)
    assert estimate(shape, full).total_gb == estimate(shape, full.model_copy(update={"unsloth": False})).total_gb


def test_plan_cli_shows_unsloth():
    plain = CliRunner().invoke(app, ["plan", "--model", "llama-7b", "--gpu-memory", "24", "--seq", "8192"])
    fast = CliRunner().invoke(app, ["plan", "--model", "llama-7b", "--gpu-memory", "24", "--seq", "8192", "--unsloth"])
    assert plain.exit_code == 0 and fast.exit_code == 0

    def lora_gb(out: str) -> float:
        row = next(line for line in out.splitlines() if "│ lora " in line)
        return float(row.split("│")[2])

    assert lora_gb(fast.output) < lora_gb(plain.output)
    assert "lora: unsloth: fused LoRA kernels + offloaded checkpointing" in fast.output.replace("\n", " ")
