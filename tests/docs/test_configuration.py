"""docs/configuration.md against the code: its tables are what opd.common.config_docs generates from the
settings classes, so a setting added, removed, renamed or redescribed without regenerating the page fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from opd.common import config_docs
from opd.common.settings import TeacherSettings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m opd.common.config_docs --write docs/configuration.md"


def test_the_page_holds_the_tables_the_code_generates() -> None:
    diff = config_docs.check(PAGE)
    assert diff == "", f"docs/configuration.md differs from the settings classes: run {REGENERATE}\n{diff}"


class PlantedSettings(TeacherSettings):
    """The teacher's settings with one setting more, as if the code had grown one the page lacks."""

    planted_limit: int = Field(default=7, description="A setting the page does not know.")


def test_the_check_catches_a_setting_the_page_lacks() -> None:
    tables = config_docs.all_tables()
    tables["teacher"] = config_docs.service_table(PlantedSettings, config_docs.serve_flags("teacher"))
    diff = config_docs.check(PAGE, tables)
    assert "+| `OPD_TEACHER_PLANTED_LIMIT` | — | `7` | A setting the page does not know. |" in diff


def test_the_check_catches_a_hand_edit_and_write_restores_the_table_but_not_the_prose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = "| `OPD_TEACHER_PORT` | `--port` | `8001` |"
    assert row in PAGE.read_text()
    page = tmp_path / "configuration.md"
    page.write_text(PAGE.read_text().replace(row, row.replace("8001", "9001")) + "\nA hand-written closing line.\n")
    assert config_docs.main(["--check", str(page)]) == 1
    out = capsys.readouterr()
    assert "-" + row.replace("8001", "9001") in out.out and "+" + row in out.out
    assert f"--write {page}" in out.err
    assert config_docs.main(["--write", str(page)]) == 0
    assert config_docs.check(page) == ""
    assert page.read_text().endswith("\nA hand-written closing line.\n")


def test_a_table_without_its_markers_is_drift(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    page.write_text(PAGE.read_text().replace("<!-- BEGIN generated: stack -->", "<!-- BEGIN: stack -->"))
    assert "without markers: ['stack']" in config_docs.check(page)
    assert config_docs.main(["--write", str(page)]) == 2


class Example(BaseModel):
    mode: Literal["a", "b"] = "a"
    empty: str = ""
    unset: int | None = None
    names: tuple[str, ...] = ("x", "y")
    max_body_bytes: int = 2 * 2**20
    flag: bool = False
    needed: float


def test_types_and_defaults_render_readably() -> None:
    rows = {r[0]: r[1:3] for r in config_docs.field_rows(Example)}
    assert rows == {
        "`mode`": ("`a` | `b`", "`a`"), "`empty`": ("str", "—"), "`unset`": ("int", "unset"),
        "`names`": ("list[str]", '`["x", "y"]`'), "`max_body_bytes`": ("int", "`2097152` (2 MiB)"),
        "`flag`": ("bool", "`false`"), "`needed`": ("float", "required"),
    }
    table = config_docs.table(("field", "type", "default", "meaning"), [("`mode`", "`a` | `b`", "`a`", "<name>")])
    assert table.splitlines()[-1] == "| `mode` | `a` \\| `b` | `a` | &lt;name> |"
