"""Every LoRA version is served exactly: the logprobs each engine reports for its own samples equal a float32
forward of the same peft model, for both engines and both lora modes, over a matrix of adapters.

The adapters are loaded one after another on one engine, so each follows one with other targets: a layer the
previous adapter changed must go back to its serving weights. vLLM merging an adapter into a fused layer
(q_proj into qkv_proj, gate_proj into gate_up_proj) served uninitialised memory in the fused layer's other
parts before the merge reloaded whole layers (vllm_merge.py, choice 1): every adapter but the all-seven one
was 13-21 nats off on SmolLM2, NaN on the tiny model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from prometheus_client import CollectorRegistry

from opd.common import protocol as p
from opd.common.errors import InvalidInput
from opd.common.settings import StudentSettings
from opd.student.engine import Sampling
from opd.student.serving import BrokenPolicy, StudentMetrics, StudentService
from tests.student.conftest import LORA_TARGETS, save_lora
from tests.student.test_hf_engine import as_rollouts

# One event loop for the module: the merging vLLM engine (a module fixture, one engine start) serves two tests.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
ATOL = 1e-3  # what the issue asks; float32 agrees to ~1e-6 on the tiny model
ATTENTION, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
# name -> (targets, LoraConfig fields); in the order they are loaded.
MATRIX: dict[str, tuple[list[str], dict]] = {
    **{f"only-{t}": ([t], {}) for t in LORA_TARGETS},
    "q+v": (["q_proj", "v_proj"], {}),
    "attention": (ATTENTION, {}),
    "mlp": (MLP, {}),
    "all-seven": (LORA_TARGETS, {}),
    "rank4-alpha32": (["q_proj", "k_proj"], {"rank": 4, "lora_alpha": 32}),
    "rslora": (["v_proj", "up_proj"], {"rank": 16, "lora_alpha": 8, "use_rslora": True}),
    "gate-after-rslora": (["gate_proj"], {"rank": 2, "lora_alpha": 3}),
}
# Per-layer ranks and alphas: peft and vLLM's LoRA kernels serve them; a merge with one scale cannot.
PATTERNS = (["q_proj", "down_proj"], {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 3.0}})
ENGINES = [("hf", "adapter"), ("hf", "merge"), ("vllm", "adapter")]  # and vLLM merging: `merging_vllm`


def build_adapter(base: Path, out: Path, targets: list[str], config: dict, seed: int) -> Path:
    config = dict(config)
    rank = config.pop("rank", 8)
    return save_lora(base, out, seed=seed, rank=rank, scale=0.05, targets=targets, **config)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, student_model: Path) -> Path:
    root = tmp_path_factory.mktemp("lora-matrix")
    for seed, (name, (targets, config)) in enumerate({**MATRIX, "patterns": PATTERNS}.items()):
        build_adapter(student_model, root / name, targets, config, seed)
    return root


def save_broken(base: Path, out: Path) -> Path:
    """A full checkpoint of the right shapes whose last layer's MLP weights are NaN."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(out, safe_serialization=True)
    return out


def peft_logprobs(base: Path, adapter: Path, rollouts: list[dict]) -> list[torch.Tensor]:
    from peft import PeftModel

    from opd.common.hf import load_causal_lm, token_logprobs

    model = PeftModel.from_pretrained(load_causal_lm(str(base), "float32", "cpu"), str(adapter)).eval()
    with torch.no_grad():
        return [token_logprobs(model, [r["prompt_token_ids"] + r["token_ids"]], [len(r["prompt_token_ids"])])[0][0]
                for r in rollouts]


async def served_error(engine, base: Path, adapter: Path, version: int, prompts) -> float:
    await engine.load_lora(adapter, version=version)
    rollouts = as_rollouts(prompts, await engine.sample(prompts, Sampling(n=2, max_tokens=12, seed=version)))
    reference = peft_logprobs(base, adapter, rollouts)
    return max((torch.tensor(r["logprobs"]) - ref).abs().max().item() for r, ref in zip(rollouts, reference, strict=True))


def make_engine(settings: StudentSettings, engine: str, mode: str):
    settings = settings.model_copy(update={"engine": engine, "lora_mode": mode, "max_lora_rank": 16})
    if engine == "hf":
        from opd.student.hf_engine import HFRolloutEngine

        return HFRolloutEngine(settings)
    from opd.student.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def merging_vllm(student_settings: StudentSettings):
    """The tiny student on vLLM, merging LoRA versions into its weights: the matrix, then the refusals."""
    engine = make_engine(student_settings, "vllm", "merge")
    yield engine
    await engine.close()


async def check_matrix(engine, student_model: Path, adapters: Path, prompts, label: str) -> None:
    names = list(MATRIX) + (["patterns"] if engine.lora_patterns else [])
    errors = {name: await served_error(engine, student_model, adapters / name, i + 1, prompts)
              for i, name in enumerate(names)}
    wrong = {name: round(e, 4) for name, e in errors.items() if not e < ATOL}
    assert not wrong, f"{label}: served logprobs off a peft forward (nats): {wrong}"


@pytest.mark.parametrize(("engine_name", "mode"), ENGINES)
async def test_every_adapter_is_served_exactly(
    student_settings: StudentSettings, student_model: Path, adapters: Path, prompts, engine_name: str, mode: str
) -> None:
    engine = make_engine(student_settings, engine_name, mode)
    try:
        await check_matrix(engine, student_model, adapters, prompts, f"{engine_name}/{mode}")
    finally:
        await engine.close()


async def test_every_adapter_is_served_exactly_by_a_merging_vllm(
    merging_vllm, student_model: Path, adapters: Path, prompts
) -> None:
    await check_matrix(merging_vllm, student_model, adapters, prompts, "vllm/merge")


async def test_a_merging_vllm_student_refuses_what_it_cannot_merge(
    merging_vllm, student_settings: StudentSettings, student_model: Path, adapters: Path, tmp_path: Path, prompts
) -> None:
    """rank_pattern, alpha_pattern, DoRA, modules_to_save, a module the model lacks: a 4xx naming the reason,
    and the serving version does not change."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(adapters / "patterns", root / "patterns")
    shutil.copytree(adapters / "q+v", root / "good")
    save_lora(student_model, root / "dora", seed=1, targets=["q_proj"], use_dora=True)
    save_lora(student_model, root / "saves-head", seed=2, targets=["q_proj"], modules_to_save=["lm_head"])
    save_lora(student_model, root / "lacks", seed=3, targets=["q_proj"])
    renamed = root / "lacks" / "adapter_model.safetensors"  # an adapter of a module this model does not have
    from safetensors.torch import load_file, save_file

    save_file({k.replace("q_proj", "c_attn"): v for k, v in load_file(renamed).items()}, renamed)
    settings = student_settings.model_copy(update={"engine": "vllm", "lora_mode": "merge", "checkpoint_root": str(root)})
    service = StudentService(merging_vllm, settings, StudentMetrics(CollectorRegistry()))  # the engine reads no root
    await service.load_weights(p.WeightsRequest(version=1, kind="lora", path="good"))
    request = p.RolloutRequest(prompts=[{"token_ids": q} for q in prompts], n=2, max_tokens=8, seed=3)
    serving = await service.rollouts(request)
    for path, reason in [("patterns", "rank_pattern"), ("dora", "DoRA"), ("saves-head", "modules_to_save"),
                         ("lacks", "c_attn, which is not a linear layer")]:
        with pytest.raises(InvalidInput) as caught:
            await service.load_weights(p.WeightsRequest(version=2, kind="lora", path=path))
        assert caught.value.status_code == 422 and reason in str(caught.value), (path, str(caught.value))
        assert service.version == 1 and await service.rollouts(request) == serving, path
    # A version whose weights give NaN: every rollout request fails, naming the version, never a NaN in JSON.
    save_broken(student_model, root / "nan")
    await service.load_weights(p.WeightsRequest(version=2, kind="full", path="nan"))
    with pytest.raises(BrokenPolicy, match=r"policy version 2 \(full checkpoint nan\) gave logprob nan"):
        await service.rollouts(request)


async def test_the_real_smollm2_serves_partial_adapters_exactly(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SmolLM2-135M-Instruct on vLLM, merging: q+v and MLP-only adapters (13-21 nats off before the fix)."""
    from opd.common.models import prepare

    root = tmp_path_factory.mktemp("smollm2-lora")
    model = root / "smollm2"
    prepare("smollm2-135m-instruct", model)
    settings = StudentSettings(model=str(model), engine="vllm", dtype="float32", device="cpu", lora_mode="merge",
                               checkpoint_root=str(root), max_lora_rank=16, max_model_len=256)
    engine = make_engine(settings, "vllm", "merge")
    try:
        tok = engine.tokenizer
        chat = lambda q: tok.apply_chat_template(  # noqa: E731
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
        prompts = [list(chat(q)) for q in ("What is the capital of Thailand?", "How many legs does a chicken have?")]
        errors = {}
        for version, (name, targets) in enumerate([("q+v", ["q_proj", "v_proj"]), ("mlp", MLP)], start=1):
            adapter = build_adapter(model, root / name, targets, {}, seed=version)
            errors[name] = await served_error(engine, model, adapter, version, prompts)
        assert all(e < ATOL for e in errors.values()), errors
    finally:
        await engine.close()
