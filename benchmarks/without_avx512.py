"""Runs a command as it would run on an x86 CPU without AVX-512 (AVX2 only), on a machine that has AVX-512.

    python benchmarks/without_avx512.py make demo
    python benchmarks/without_avx512.py --check            # what torch and vLLM would pick, then exit

The figures of a machine with AVX2 and no AVX-512 (the slower of the machines the project has run on: 2.7x on
the same training step) can be estimated where only an AVX-512 one is at hand. Every library that chooses its
kernels by the CPU's instruction set is told to stop at AVX2, in this process and every process it starts:

1) torch's own kernels: ATEN_CPU_CAPABILITY=avx2;
2) oneDNN (torch's and vLLM's matrix products): ONEDNN_MAX_CPU_ISA=AVX2 (and DNNL_ for older builds);
3) MKL (torch's BLAS): MKL_ENABLE_INSTRUCTIONS=AVX2;
4) vLLM's CPU kernels, which it picks by asking torch whether the CPU has AVX-512: a sitecustomize module, on
   PYTHONPATH for this command only, answers no before vLLM's CPU platform loads (vllm._C_AVX2 instead of
   vllm._C_AVX512).

An estimate, not the other machine: the clock, caches and memory stay this machine's, and code compiled for
one instruction set alone (some of numpy's) still uses AVX-512. Say so beside any figure it gives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
       "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

# Loaded by every Python process of the command (site imports `sitecustomize` from sys.path): when vLLM's CPU
# platform is first imported, torch (already imported by vLLM) is made to answer that the CPU has no AVX-512.
SITECUSTOMIZE = '''
import importlib.abc
import sys


class _NoAvx512(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm.platforms.cpu":
            sys.meta_path.remove(self)
            import torch.cpu

            torch.cpu._is_avx512_supported = lambda: False
            torch.cpu._is_avx512_bf16_supported = lambda: False
        return None  # the module itself is found as always


sys.meta_path.insert(0, _NoAvx512())
'''

CHECK = """
import torch, vllm.platforms.cpu as c, vllm.platforms as p
c.CpuPlatform.import_kernels()
libs = sorted({line.split()[-1].rsplit('/', 1)[-1] for line in open('/proc/self/maps') if 'vllm/_C' in line})
print('torch kernels:', torch.backends.cpu.get_cpu_capability(), '| vLLM kernels:', ', '.join(libs) or 'none loaded')
"""


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    with tempfile.TemporaryDirectory(prefix="no-avx512-") as folder:
        Path(folder, "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", CHECK] if args == ["--check"] else args
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
