"""opd: on-policy distillation as three HTTP services (teacher, student, trainer).

    from opd import TeacherClient
    teacher = TeacherClient("http://127.0.0.1:8001", api_key="...")

The package's source is the folder services/ (opd.teacher is services/teacher/,
...). Importing `opd` is cheap: the clients, the compatible-protocol clients,
the protocol models and the errors are loaded on first use (PEP 562), and none
of them needs more than httpx and pydantic (the base install). The services
themselves (opd.teacher, opd.student, opd.trainer, opd.up) need the extras.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["TeacherClient", "AsyncTeacherClient", "StudentClient", "AsyncStudentClient", "TrainerClient",
         "AsyncTrainerClient"],
        "opd.common.client",
    ),
    **dict.fromkeys(
        ["OpenAITeacherClient", "AsyncOpenAITeacherClient", "SGLangTeacherClient", "AsyncSGLangTeacherClient",
         "teacher_client", "async_teacher_client"],
        "opd.common.compat_client",
    ),
    **dict.fromkeys(
        ["ChatMessage", "Prompt", "ScoreSequence", "LogprobsRequest", "TopLogprob", "SequenceLogprobs", "Usage",
         "LogprobsResponse", "RenderRequest", "RenderResponse", "RolloutRequest", "Rollout", "RolloutResponse",
         "WeightsRequest", "WeightsResponse", "ServiceInfo", "TrainerInfo", "Health", "ErrorBody", "RunCreated",
         "RunStatus", "RunList", "RunMetrics"],
        "opd.common.protocol",
    ),
    **dict.fromkeys(["OPDError", "ServiceError", "ServiceUnavailable", "TokenizerMismatch"], "opd.common.errors"),
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from opd.common.client import (AsyncStudentClient, AsyncTeacherClient, AsyncTrainerClient, StudentClient,
                                   TeacherClient, TrainerClient)
    from opd.common.compat_client import (AsyncOpenAITeacherClient, AsyncSGLangTeacherClient, OpenAITeacherClient,
                                          SGLangTeacherClient, async_teacher_client, teacher_client)
    from opd.common.errors import OPDError, ServiceError, ServiceUnavailable, TokenizerMismatch
    from opd.common.protocol import (ChatMessage, ErrorBody, Health, LogprobsRequest, LogprobsResponse, Prompt,
                                     RenderRequest, RenderResponse, Rollout, RolloutRequest, RolloutResponse,
                                     RunCreated, RunList, RunMetrics, RunStatus, ScoreSequence, SequenceLogprobs,
                                     ServiceInfo, TopLogprob, Usage, WeightsRequest, WeightsResponse)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'opd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
