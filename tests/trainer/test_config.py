"""The run config: YAML, env and --set layers; an invalid config names the field; the shipped example loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from opd.trainer.config import ConfigError, RunConfig, build_config, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "student": {"model": "models/student"},
    "teacher_urls": ["http://127.0.0.1:8001"],
    "student_url": "http://127.0.0.1:8002",
    "dataset": {"path": "prompts.jsonl"},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_then_env_then_set(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "sampling": {"max_tokens": 16, "temperature": 1.0}, "steps": 5})
    env = {"OPD_TRAIN_SAMPLING__MAX_TOKENS": "24", "OPD_TRAIN_STEPS": "7", "OPD_API_KEY": "k"}
    config = load_config(path, ["steps=9", "student.lora.rank=4", "student.lora.target_modules=[q_proj, v_proj]",
                                "loss.kind=ppo"], environ=env)
    assert config.sampling.max_tokens == 24  # env over YAML
    assert config.steps == 9  # --set over env
    assert config.student.lora.rank == 4 and config.student.lora.target_modules == ("q_proj", "v_proj")
    assert config.loss.kind == "ppo" and config.api_key == "k"
    assert config.sampling.temperature == 1.0 and config.student.finetune == "lora"


def test_measures_keep_the_order_they_are_given_in(tmp_path: Path) -> None:
    """Tables and logs list eval.measures in the config's order (they were sorted by name)."""
    measures = {"correct": "opd.tasks.short_answer:correct", "content": "opd.tasks.short_answer:content"}
    data = {**BASE, "eval": {"measures": measures}}
    assert list(build_config(data, environ={}).eval.measures) == ["correct", "content"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert list(load_config(path, environ={}).eval.measures) == ["correct", "content"]


def test_a_given_environment_is_the_only_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build configs with environ={}: variables of the process running them must not leak in."""
    monkeypatch.setenv("OPD_TRAIN_STEPS", "99")
    monkeypatch.setenv("OPD_TRAIN_CHECKPOINT_ROOT", "/elsewhere")
    monkeypatch.setenv("OPD_API_KEY", "leaked")
    isolated = build_config(BASE, environ={})
    assert isolated.steps == 100 and isolated.checkpoint_root == "checkpoints" and isolated.api_key is None
    given = build_config(BASE, environ={"OPD_TRAIN_STEPS": "7"})
    assert given.steps == 7 and given.checkpoint_root == "checkpoints"
    assert build_config(BASE).steps == 99 and build_config(BASE).checkpoint_root == "/elsewhere", "no environ: the process's"


def test_config_is_frozen_and_fully_specified() -> None:
    config = build_config(BASE, environ={})
    with pytest.raises(Exception):
        config.steps = 3  # type: ignore[misc]
    dumped = config.model_dump()
    for section in ("student", "dataset", "sampling", "optimizer", "loss", "eval", "services"):
        assert isinstance(dumped[section], dict)
    assert RunConfig.model_validate(dumped) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["sampling.max_tokens=0"], "sampling.max_tokens"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["loss.kind=sft"], "loss.kind"),
        (["student.lora.rnk=4"], "student.lora.rnk"),
        (["kl_discount=1.5"], "kl_discount"),
        (["reward_fn=not_a_spec"], "reward_fn"),
        (["eval.measures={correct: not_a_spec}"], "eval.measures.correct"),
        (["eval.measures={Bad-Name: a.b:c}"], "eval.measures.Bad-Name"),
        (["substeps=100", "sampling.prompts_per_step=2", "sampling.samples_per_prompt=2"], "substeps"),
    ],
)
def test_invalid_config_names_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(BASE, overrides, environ={})
    assert field in str(err.value)


def test_missing_sections_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"student": {"model": "x"}}, environ={})
    message = str(err.value)
    assert "teacher_urls: Field required" in message and "dataset: Field required" in message


def test_bad_override_syntax_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section.field=value"):
        build_config(BASE, ["steps"], environ={})
    with pytest.raises(ConfigError, match="is a value, not a section"):
        build_config(BASE, ["student.model.x=1"], environ={})
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_example_config_and_prompts_load() -> None:
    from opd.trainer.data import load_prompts

    config = load_config(REPO / "services/configs/smollm2.yaml", environ={})
    assert config.student.finetune == "lora" and config.steps >= 30
    train, held_out = load_prompts(config.dataset.model_copy(update={"path": str(REPO / config.dataset.path)}), config.seed)
    assert len(train) >= 200 and len(held_out) == config.dataset.eval_size
    texts = [row.prompt.messages[0].content for row in train]
    assert len(set(texts)) == len(texts), "the shipped prompts are all different"


def test_sft_with_several_teachers_is_refused() -> None:
    """sft samples every row from the one teacher_sampler_url: per-teacher figures would credit the wrong teacher."""
    several = {k: v for k, v in BASE.items() if k != "teacher_urls"} | {
        "teachers": {"a": {"urls": ["http://127.0.0.1:8001"]}, "b": {"urls": ["http://127.0.0.1:8004"]}},
        "objective": "sft", "teacher_sampler_url": "http://127.0.0.1:8005"}
    with pytest.raises(ConfigError, match="run sft with one teacher") as err:
        build_config(several, environ={})
    assert "(a, b)" in str(err.value)
    one = {**several, "teachers": {"a": {"urls": ["http://127.0.0.1:8001"]}}}
    assert build_config(one, environ={}).objective == "sft"
