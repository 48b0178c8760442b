"""The `opd` command: models, services, training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.teacher.cli import app as teacher_app

app = typer.Typer(help="opd: on-policy distillation as a service stack.", no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Prepare model folders.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(teacher_app, name="teacher")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Model to build: smollm2-135m-instruct.")],
    out: Annotated[Path, typer.Argument(help="Folder to write.")],
    layers: Annotated[int | None, typer.Option(help="Keep only the first N decoder layers (a smaller student).")] = None,
    dtype: Annotated[str, typer.Option(help="Saved dtype.")] = "bfloat16",
    force: Annotated[bool, typer.Option(help="Rebuild even when the folder is up to date.")] = False,
) -> None:
    """Build a transformers/safetensors folder that vLLM and transformers load."""
    from services.common.errors import InvalidRequest
    from services.common.models import prepare

    try:
        path = prepare(name, out, layers=layers, dtype=dtype, force=force)
    except InvalidRequest as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"ready: {path}")
