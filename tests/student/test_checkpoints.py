"""Checkpoint checks without an engine: paths that leave the root, and folders that do not fit the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.common.errors import InvalidInput, InvalidRequest, NotFound
from opd.student.checkpoints import BaseModel, check_full, check_lora, resolve


@pytest.fixture(scope="module")
def base(student_model: Path) -> BaseModel:
    return BaseModel.from_folder(str(student_model))


def test_base_model_reads_headers(base: BaseModel) -> None:
    assert base.architectures == ("LlamaForCausalLM",) and base.vocab_size == 512
    assert base.shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 128)
    assert base.shapes["lm_head.weight"] == (512, 128) and len(base.shapes) == 21


def test_good_checkpoints_pass(checkpoint_root: Path, base: BaseModel) -> None:
    check_full(resolve(checkpoint_root, "full-a"), checkpoint_root, base)
    check_full(resolve(checkpoint_root, "latest"), checkpoint_root, base)  # a symlink inside the root
    check_full(resolve(checkpoint_root, "./full-a/"), checkpoint_root, base)
    check_lora(resolve(checkpoint_root, "lora-a"), checkpoint_root, base, max_rank=8)


PATHS = [
    ("..", InvalidRequest, "contains '..'"),
    ("full-a/../../etc", InvalidRequest, "contains '..'"),
    ("/etc", InvalidRequest, "is absolute"),
    ("escape", InvalidRequest, "leads out of the checkpoint root"),
    ("missing", NotFound, "no checkpoint at 'missing'"),
    ("nul\x00byte", InvalidRequest, "NUL character"),
    ("full-a/config.json", InvalidInput, "is a file"),
]


@pytest.mark.parametrize(("path", "error", "fragment"), PATHS, ids=[p[0] for p in PATHS])
def test_paths_out_of_the_root_are_refused(checkpoint_root: Path, path: str, error: type, fragment: str) -> None:
    with pytest.raises(error) as caught:
        resolve(checkpoint_root, path)
    assert fragment in str(caught.value)


def test_missing_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="checkpoint root .* does not exist"):
        resolve(tmp_path / "nowhere", "v1")


FULL = [
    ("wide", "wrong shapes: lm_head.weight [512, 64] (expected [512, 128])"),
    ("mistral", "is a MistralForCausalLM; the student serves LlamaForCausalLM"),
    ("empty", "config.json is missing in empty/"),
    ("lora-a", "config.json is missing"),
    ("truncated", "not a readable safetensors file"),
    ("sneaky", "leads out of the checkpoint root"),
]


@pytest.mark.parametrize(("path", "fragment"), FULL, ids=[f[0] for f in FULL])
def test_bad_full_checkpoints(checkpoint_root: Path, base: BaseModel, path: str, fragment: str) -> None:
    with pytest.raises((InvalidInput, InvalidRequest)) as caught:
        check_full(resolve(checkpoint_root, path), checkpoint_root, base)
    assert fragment in str(caught.value)


def test_missing_tensors_are_named(checkpoint_root: Path, base: BaseModel) -> None:
    shapes = dict(base.shapes, **{"model.layers.2.mlp.up_proj.weight": (256, 128)})
    with pytest.raises(InvalidInput, match=r"missing tensors: model\.layers\.2\.mlp\.up_proj\.weight"):
        check_full(resolve(checkpoint_root, "full-a"), checkpoint_root, BaseModel(base.architectures, 512, False, shapes))


LORA = [
    ("lora-wide", "has shape [8, 128]; the student's model.layers.0.mlp.down_proj needs [r, 256]"),
    ("lora-rank32", "has LoRA rank 32; the student serves ranks up to 16"),
    ("lora-head", "adapts lm_head (embeddings or output head)"),
    ("full-a", "adapter_config.json is missing in full-a/"),
    ("empty", "adapter_config.json is missing"),
]


@pytest.mark.parametrize(("path", "fragment"), LORA, ids=[f[0] for f in LORA])
def test_bad_lora_checkpoints(checkpoint_root: Path, base: BaseModel, path: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_lora(resolve(checkpoint_root, path), checkpoint_root, base, max_rank=16)
    assert fragment in str(caught.value)
