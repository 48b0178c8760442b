"""A vLLM general plugin: the teacher's logprobs normalised in float64 (vllm_engine.py choice 8).

vLLM loads every `vllm.general_plugins` entry point (pyproject.toml: `opd_float64_logprobs`) in each of its
processes, including the engine and worker processes it spawns (its CPU platform always spawns them). In a process
whose environment has OPD_FLOAT64_LOGPROBS=1 (set by the teacher's vLLM engine while it builds its engine, so
inherited by exactly those processes), `register` replaces vLLM's `Sampler.compute_logprobs`, a float32
log_softmax, with opd's float64-normalised one (services/common/hf.py `float64_log_softmax`, choice 3); anywhere
else it does nothing (the student's engines keep vLLM's own).
"""

from __future__ import annotations

import logging
import os

ENV = "OPD_FLOAT64_LOGPROBS"
log = logging.getLogger(__name__)


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    from vllm.v1.sample.sampler import Sampler

    if not isinstance(Sampler.__dict__.get("compute_logprobs"), staticmethod):
        log.warning("this vLLM has no Sampler.compute_logprobs to replace: the teacher's logprobs keep vLLM's float32 "
                    "normaliser, which depends on the vocabulary's order (opd.teacher.vllm_plugin)")
        return
    from opd.common.hf import float64_log_softmax

    Sampler.compute_logprobs = staticmethod(float64_log_softmax)
