"""Start opd services as real child processes for a test, and always stop them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.process import ServiceProcess, free_port


@contextmanager
def running(
    name: str, args: list[str], *, log_dir: Path, env: dict[str, str] | None = None,
    api_key: str | None = None, timeout: float = 300.0,
) -> Iterator[ServiceProcess]:
    port = free_port()
    full_env = {"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    if api_key:
        full_env["OPD_API_KEY"] = api_key
    proc = ServiceProcess(name, [*args, "--port", str(port)], port, log_file=log_dir / f"{name}-{port}.log", env=full_env)
    proc.start()
    try:
        proc.wait_ready(timeout=timeout, api_key=api_key)
        yield proc
    except Exception:
        if proc.log_file and proc.log_file.exists():
            sys.stderr.write(proc.log_file.read_text()[-4000:])
        raise
    finally:
        proc.stop()
