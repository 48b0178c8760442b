"""`opd models prepare`: SmolLM2-135M-Instruct from its GGUF file into a normal folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app
from opd.common.errors import InvalidRequest
from opd.common.models import gguf_file, prepare


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="known: smollm2-135m-instruct"):
        prepare("gpt-7", tmp_path / "x")


@pytest.mark.slow
def test_prepare_cut_student_via_cli(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-l2"
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2-135m-instruct", str(out), "--layers", "2"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # weights are dequantized: vLLM must not look for GGUF
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"

    path = gguf_file("smollm2-135m-instruct")
    source = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        expected = source.state_dict()[name].to(torch.bfloat16).float()
        assert torch.equal(model.state_dict()[name], expected), name
    # A second call with the same options reuses the folder.
    mtime = (out / "model.safetensors").stat().st_mtime
    prepare("smollm2-135m-instruct", out, layers=2)
    assert (out / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(InvalidRequest, match="between 1 and 30"):
        prepare("smollm2-135m-instruct", tmp_path / "bad", layers=31)


@pytest.mark.slow
def test_prepare_drops_middle_layers_and_renumbers_the_rest(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2-ends"
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2-135m-instruct", str(out), "--drop-layers", "1-28"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    path = gguf_file("smollm2-135m-instruct")
    source = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    for kept, old in ((0, 0), (1, 29)):  # layer 29 is now layer 1
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            expected = source[f"model.layers.{old}.{part}"].to(torch.bfloat16).float()
            assert torch.equal(model[f"model.layers.{kept}.{part}"], expected), (kept, part)


@pytest.mark.parametrize(("spec", "message"), [
    ("12-40", "outside layers 0-29"), ("a-b", "spans like"), ("0-29", "would drop all 30"), ("5-3", "outside"),
])
def test_bad_drop_layer_specs_say_what_to_fix(spec: str, message: str) -> None:
    from opd.common.models import parse_layer_spans

    with pytest.raises(InvalidRequest, match=message):
        parse_layer_spans(spec, 30)


def test_layer_spans_parse() -> None:
    from opd.common.models import parse_layer_spans

    assert parse_layer_spans("12-21", 30) == list(range(12, 22))
    assert parse_layer_spans("3, 7-9,3", 30) == [3, 7, 8, 9]
