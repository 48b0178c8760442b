"""`opd models prepare`: SmolLM2-135M-Instruct from its GGUF file into a normal folder.

Every prepared weight is compared with the GGUF file as transformers dequantizes
it (`gguf_state`, loaded once for the module): the cache that `prepare` keeps
(the session's `OPD_CACHE_DIR`) must give what the GGUF file gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opd.cli import app
from opd.common.errors import InvalidRequest
from opd.common.models import cache_dir, dequantized, gguf_file, prepare


@pytest.fixture(scope="module")
def gguf_state() -> dict[str, torch.Tensor]:
    """SmolLM2's weights straight from its GGUF file, dequantized by transformers: the ground truth."""
    from transformers import AutoModelForCausalLM

    path = gguf_file("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="known: smollm2-135m-instruct"):
        prepare("gpt-7", tmp_path / "x")


@pytest.mark.slow
def test_prepare_cut_student_via_cli(tmp_path: Path, gguf_state: dict[str, torch.Tensor]) -> None:
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

    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        expected = gguf_state[name].to(torch.bfloat16).float()
        assert torch.equal(model.state_dict()[name], expected), name
    # A second call with the same options reuses the folder.
    mtime = (out / "model.safetensors").stat().st_mtime
    prepare("smollm2-135m-instruct", out, layers=2)
    assert (out / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(InvalidRequest, match="between 1 and 30"):
        prepare("smollm2-135m-instruct", tmp_path / "bad", layers=31)


@pytest.mark.slow
def test_prepare_drops_middle_layers_and_renumbers_the_rest(tmp_path: Path, gguf_state: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2-ends"
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2-135m-instruct", str(out), "--drop-layers", "1-28"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    source = gguf_state
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


@pytest.mark.slow
def test_the_dequantized_model_is_cached_exactly(gguf_state: dict[str, torch.Tensor]) -> None:
    """The cache holds every weight of the GGUF file, float32, bit for bit; a second call reads it."""
    from safetensors.torch import load_file

    folder = dequantized("smollm2-135m-instruct")
    assert folder.parent.parent == cache_dir(), "the session's OPD_CACHE_DIR holds the cache"
    cached = load_file(folder / "model.safetensors")
    assert set(gguf_state) - set(cached) <= {"lm_head.weight"}  # tied to the embeddings, saved once
    for name, tensor in cached.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, gguf_state[name]), name
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert dequantized("smollm2-135m-instruct") == folder
    assert (folder / "model.safetensors").stat().st_mtime == mtime, "a second call rebuilt the cache"


@pytest.mark.slow
def test_prepare_makes_teachers_of_another_tokenizer(tmp_path: Path) -> None:
    """--permute-vocab: other ids, the same function (a text scores the same under both); --drop-merges: the same
    vocabulary, longer tokenizations; each fingerprint differs from SmolLM2's (the trainer aligns them on bytes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.common.hf import token_logprobs
    from opd.common.tokenizer import tokenizer_fingerprint

    runner = CliRunner()
    folders = {}
    for name, extra in (("plain", []), ("permuted", ["--permute-vocab", "1"]), ("fewer", ["--drop-merges", "20"])):
        folders[name] = tmp_path / name
        result = runner.invoke(app, ["models", "prepare", "smollm2-135m-instruct", str(folders[name]), "--layers", "2",
                                     "--dtype", "float32", *extra])
        assert result.exit_code == 0, result.output
    toks = {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}
    assert len({tokenizer_fingerprint(t) for t in toks.values()}) == 3
    text = "The capital of Japan is Tokyo, 東京."
    ids = {name: t.encode(text) for name, t in toks.items()}
    assert ids["permuted"] != ids["plain"] and len(ids["permuted"]) == len(ids["plain"])
    assert len(ids["fewer"]) > len(ids["plain"]) and toks["fewer"].decode(ids["fewer"]) == toks["plain"].decode(ids["plain"])
    scored = {}
    for name in ("plain", "permuted"):
        model = AutoModelForCausalLM.from_pretrained(folders[name], dtype=torch.float32)
        with torch.no_grad():
            scored[name] = token_logprobs(model, [ids[name]], [1])[0].logprobs
    assert torch.allclose(scored["plain"], scored["permuted"], atol=1e-5)
    with pytest.raises(InvalidRequest, match="2 or more"):
        prepare("smollm2-135m-instruct", tmp_path / "bad", drop_merges=1)
