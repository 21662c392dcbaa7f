from transformers import AutoTokenizer, GenerationConfig

from stepwise.models import known_name, resolve_model_dir


def test_known_model_resolves_offline_with_the_right_eos():
    path = resolve_model_dir("SmolLM2-135M-Instruct")
    assert (path / "model.safetensors").exists() and "conversion v" in (path / "STEPWISE_SOURCE.txt").read_text()
    tok = AutoTokenizer.from_pretrained(path)
    # the GGUF metadata says <|im_start|>; the released model ends its turns with <|im_end|>
    assert tok.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(path).eos_token_id == tok.eos_token_id


def test_unknown_name_is_a_clear_error(tmp_path):
    assert known_name("no-such-model") is None
    try:
        resolve_model_dir("no-such-model")
    except FileNotFoundError as exc:
        assert "not a known name" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
