"""The stack files opd ships: `opd up` with no argument runs the skill demo, and runs it from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from opd.common.errors import InvalidInput
from opd.up.config import DEFAULT_CONFIG, load_stack
from opd.up.runner import PACKAGE_DIR, Stack, data_path


def test_the_default_stack_is_the_skill_demo() -> None:
    stack = load_stack(None)
    assert DEFAULT_CONFIG.name == "skill.yaml"
    assert stack.run["teacher_prompt"]["system"] and stack.run["eval"]["verifier"]
    assert stack.run["steps"] * 30 < 600, "the demo must fit 10 minutes on a 2-core machine at ~30 s a step"


def test_every_shipped_stack_file_validates() -> None:
    for name in ("skill.yaml", "heal.yaml", "answer_format.yaml"):
        load_stack(DEFAULT_CONFIG.parent / name)


def test_every_shipped_stack_file_takes_two_student_replicas_as_is() -> None:
    """`opd up --set student.replicas=2` needs no port of its own: the second replica goes 10 past the first,
    clear of the teacher's and the trainer's default ports."""
    for name in ("skill.yaml", "heal.yaml", "answer_format.yaml"):
        stack = load_stack(DEFAULT_CONFIG.parent / name, ["student.replicas=2"])
        first = stack.student.ports[0]
        assert stack.student.ports == [first, first + 10] and stack.student.names == ["student-1", "student-2"]
    assert load_stack(None, ["student.replicas=2"]).student.ports == [8002, 8012]


def test_a_relative_dataset_path_is_found_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = "services/data/questions/train.jsonl"
    assert Path(data_path(shipped)) == PACKAGE_DIR / "data/questions/train.jsonl" and Path(data_path(shipped)).is_file()
    (tmp_path / "services/data/questions").mkdir(parents=True)
    (tmp_path / shipped).write_text('{"prompt": "mine"}\n')
    assert data_path(shipped) == shipped, "a file in the working folder wins over the shipped one"
    assert data_path("no/such/file.jsonl") == "no/such/file.jsonl", "a missing file keeps its name for the error"
    assert data_path(str(tmp_path / shipped)) == str(tmp_path / shipped)


def test_the_run_opd_up_submits_names_the_shipped_data_absolutely(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    stack = Stack(load_stack(None), Console())
    stack.url = lambda name: f"http://{name}"  # no process is started
    run = stack.run_config("student-model")
    assert Path(run["dataset"]["path"]).is_absolute() and Path(run["dataset"]["path"]).is_file()
    assert Path(run["dataset"]["eval_path"]).is_file()


def test_student_replicas_run_as_processes_of_their_own_and_the_run_gets_their_urls(tmp_path) -> None:
    """`student: {replicas: 2, port: P}` is two students on P and P+10 (or a listed port each), so the default
    8002 with replicas clears the trainer's 8003; the run opd up submits names both as student_urls, a lone
    student stays student_url, and a port taken twice, or replicas past 65535, are refused."""
    def stack(student: dict, **more) -> Stack:
        data = {"workdir": str(tmp_path / "w"), "trainer": {"port": 8100},
                "teacher": {"model": {"prepare": "smollm2-135m-instruct"}, "port": 8101},
                "student": {"model": {"prepare": "smollm2-135m-instruct", "layers": 4}, **student}, **more}
        path = tmp_path / "stack.yaml"
        path.write_text(yaml.safe_dump(data))
        made = Stack(load_stack(path), Console())
        made.url = lambda name: f"http://{name}"  # no process is started
        return made

    two = stack({"replicas": 2, "port": 8102}, run={"student_url": "http://mine"})  # opd up gives its own
    assert two.config.student.ports == [8102, 8112] and two.config.student.names == ["student-1", "student-2"]
    run = two.run_config("student-model")
    assert run["student_urls"] == ["http://student-1", "http://student-2"] and "student_url" not in run
    listed = stack({"port": [8110, 8120, 8130]})
    assert listed.config.student.ports == [8110, 8120, 8130] and len(listed.config.student.names) == 3
    one = stack({"port": 8102})
    assert one.config.student.names == ["student"] and one.run_config("m")["student_url"] == "http://student"
    assert "student_urls" not in one.run_config("m")
    assert stack({"replicas": 3, "port": 8102}).config.student.ports == [8102, 8112, 8122]
    with pytest.raises(InvalidInput, match=r"different ports; got \[8101, 8090, 8100, 8100\]"):
        stack({"replicas": 2, "port": 8090})
    with pytest.raises(InvalidInput, match=r"3 replicas from port 65520, 10 apart, pass 65535 \(the last would be 65540\)"):
        stack({"replicas": 3, "port": 65520})
    with pytest.raises(InvalidInput, match=r"replicas: 3 replicas, but 2 ports listed"):
        stack({"replicas": 3, "port": [8110, 8120]})


def test_several_teachers_run_as_processes_of_their_own_and_the_run_names_each(tmp_path) -> None:
    """`teachers: {name: {...}}` in place of `teacher:`: a process per teacher (`teacher-<name>`) on its own port;
    the run opd up submits names each by its URL, beside what run.teachers.<name> says; the stack's mistakes
    (both ways, neither, a run teacher the stack lacks, the single-teacher fields, a shared port) are refused."""
    def write(**fields) -> Path:
        data = {"workdir": str(tmp_path / "w"), "trainer": {"port": 8100},
                "student": {"model": {"prepare": "smollm2-135m-instruct", "layers": 4}, "port": 8102}, **fields}
        path = tmp_path / "stack.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def stack(**fields) -> Stack:
        made = Stack(load_stack(write(**fields)), Console())
        made.url = lambda name: f"http://{name}"  # no process is started
        return made

    model = {"prepare": "smollm2-135m-instruct"}
    teachers = {"math": {"model": model, "port": 8101}, "style": {"model": {"path": "models/style"}, "port": 8111, "engine": "hf"}}
    two = stack(teachers=teachers, run={"teachers": {"style": {"teacher_prompt": {"system": "Be terse."}}},
                                        "default_teacher": "math"})
    assert list(two.config.teacher_specs) == ["teacher-math", "teacher-style"]
    assert two.config.teacher_ports == [8101, 8111] and two.config.teacher is None
    assert two.config.teacher_specs["teacher-style"].engine == "hf"
    run = two.run_config("student-model")
    assert run["teachers"] == {"math": {"urls": ["http://teacher-math"]},
                               "style": {"urls": ["http://teacher-style"], "teacher_prompt": {"system": "Be terse."}}}
    assert "teacher_urls" not in run and run["default_teacher"] == "math"
    from opd.trainer.config import RunConfig

    assert set(RunConfig.model_validate(run).teacher_set) == {"math", "style"}, "the trainer takes the run as filled in"
    one = stack(teacher={"model": model, "port": 8101})
    assert list(one.config.teacher_specs) == ["teacher"] and one.run_config("m")["teacher_urls"] == ["http://teacher"]
    assert "teachers" not in one.run_config("m")

    refused = {
        "give teacher \\(one teacher\\) or teachers \\(several, by name\\), not both":
            {"teacher": {"model": model, "port": 8101}, "teachers": teachers},
        "give teacher \\(one teacher\\) or teachers \\(several, by name\\)$": {},
        "run.teachers: art not among the stack's teachers \\(math, style\\)":
            {"teachers": teachers, "run": {"teachers": {"art": {"urls": ["http://x"]}}}},
        "run.teacher_prompt: the stack's teachers are several":
            {"teachers": teachers, "run": {"teacher_prompt": {"system": "x"}}},
        "run.teachers: the stack runs one teacher":
            {"teacher": {"model": model, "port": 8101}, "run": {"teachers": {"a": {"urls": ["http://x"]}}}},
        r"teachers, student and trainer need different ports; got \[8101, 8102, 8102, 8100\]":
            {"teachers": {"math": {"model": model, "port": 8101}, "style": {"model": model, "port": 8102}}},
        r"teachers, student and trainer need different ports; got \[8101, 8101, 8102, 8100\]":
            {"teachers": {"math": {"model": model, "port": 8101}, "style": {"model": model, "port": 8101}}},
        "teachers.Bad name": {"teachers": {"Bad name": {"model": model, "port": 8101}}},
        "teachers: .*at least 1": {"teachers": {}},
    }
    for message, fields in refused.items():
        with pytest.raises(InvalidInput, match=message):
            load_stack(write(**fields))


def test_a_taken_teacher_port_names_that_teacher(tmp_path) -> None:
    import socket

    from opd.common.process import StartupFailed

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = {"workdir": str(tmp_path / "w"), "trainer": {"port": 8100},
                "student": {"model": {"path": "s"}, "port": 8102},
                "teachers": {"a": {"model": {"path": "a"}, "port": 8101}, "b": {"model": {"path": "b"}, "port": port}}}
        path = tmp_path / "stack.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(StartupFailed, match=rf"port {port} \(teacher-b\) .* --set teachers.b.port=N"):
            Stack(load_stack(path), Console()).check_ports()
