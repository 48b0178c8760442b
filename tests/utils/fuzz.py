"""Fuzz a running opd service with schemathesis, the real CLI, bounded in time.

schemathesis reads the service's own OpenAPI document and sends requests made
from it: valid ones, boundary values, and invalid ones (wrong types, values
out of bounds, missing fields). The checks say what must hold for every answer:
- no server error: any 5xx but a 503 fails (503 means overloaded or loading,
  and must carry Retry-After, which the document declares);
- the status code, content type, headers and body are ones the document lists;
- invalid data (by the document) is refused with a 4xx;
- with an API key, a request without it is refused.
The phases: coverage (boundary and invalid values of every field, each
operation in turn), then fuzzing and stateful runs until the time is spent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The tests' budget per service; OPD_FUZZ_SECONDS=90 for the longer runs docs/benchmarks.md reports.
FUZZ_SECONDS = int(os.environ.get("OPD_FUZZ_SECONDS", "20"))

CONFIG = """\
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "409", "413", "422"]
"""
CHECKS = [
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "negative_data_rejection",
]


@dataclass
class FuzzRun:
    returncode: int
    output: str

    @property
    def cases(self) -> int:
        found = re.search(r"(\d+) generated", self.output)
        return int(found.group(1)) if found else 0


def schemathesis() -> str:
    beside = Path(sys.executable).with_name("schemathesis")
    return str(beside) if beside.exists() else (shutil.which("schemathesis") or "schemathesis")


def fuzz(url: str, workdir: Path, *, seconds: int, api_key: str | None = None, seed: int = 0, extra: tuple[str, ...] = ()) -> FuzzRun:
    """One schemathesis run of about `seconds` against the service at `url`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    checks = CHECKS + (["ignored_auth"] if api_key else [])
    cmd = [
        schemathesis(), "--config-file", str(config), "run", f"{url}/openapi.json", "--max-time", str(seconds),
        "--checks", ",".join(checks), "--seed", str(seed), "--request-timeout", "60", "--wait-for-schema", "30",
        "--suppress-health-check", "too_slow", "--phases", "coverage,fuzzing,stateful", *extra,
    ]
    if api_key:
        cmd += ["--header", f"Authorization: Bearer {api_key}"]
    # cwd: schemathesis keeps its example database and reports where it runs.
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=seconds + 300)
    run = FuzzRun(done.returncode, done.stdout + done.stderr)
    (workdir / "schemathesis.log").write_text(run.output)
    print(f"schemathesis against {url}: {run.cases} test cases generated in about {seconds} s, exit {run.returncode}")
    return run
