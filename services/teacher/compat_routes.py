"""Routes that let pipelines written for vLLM or SGLang servers use the teacher.

- vLLM / OpenAI: POST /v1/completions (prompt scoring), GET /v1/models;
- SGLang: POST /generate (input logprobs, max_new_tokens 0).

Thin routes: auth, admission and error mapping are the app's (server.py),
the translation lives in openai_compat.py and sglang_compat.py, the scoring
in TeacherService; as on /logprobs, a request whose client disconnects
is cancelled. Error bodies carry opd's `detail` and, for the clients of
those servers, vLLM's `error` object (server.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from opd.common import openai_protocol as o
from opd.common import protocol as p
from opd.common import sglang_protocol as s
from opd.common.errors import NotReady
from opd.common.server import Authorized, until_disconnect
from opd.teacher.openai_compat import OpenAICompletions
from opd.teacher.sglang_compat import SGLangGenerate

PATHS = ("/v1/", "/generate")  # where error bodies also carry vLLM's `error` object
ERRORS = {
    400: {"model": p.ErrorBody, "description": "not a scoring request (generation, streaming), or not servable as asked"},
    401: {"model": p.ErrorBody, "description": "missing or wrong API key"},
    404: {"model": p.ErrorBody, "description": "another model than the one served"},
    413: {"model": p.ErrorBody, "description": "over the sequences or tokens limit"},
    422: {"model": p.ErrorBody, "description": "invalid field, out-of-vocabulary id, or too long"},
    503: {"model": p.ErrorBody, "description": "loading or overloaded; retry after Retry-After seconds"},
}


def _handler(request: Request, name: str):
    handler = getattr(request.app.state, name, None)
    if handler is None:
        raise NotReady("the teacher is still loading its model; retry shortly")
    return handler


def get_openai(request: Request) -> OpenAICompletions:
    return _handler(request, "openai")


def get_sglang(request: Request) -> SGLangGenerate:
    return _handler(request, "sglang")


OpenAI = Annotated[OpenAICompletions, Depends(get_openai)]
SGLang = Annotated[SGLangGenerate, Depends(get_sglang)]
router = APIRouter(dependencies=[Authorized], responses=ERRORS)


@router.get("/v1/models", tags=["vllm-compatible"])
async def models(compat: OpenAI) -> o.ModelList:
    """The served model, as vLLM lists it."""
    return compat.models()


@router.post("/v1/completions", tags=["vllm-compatible"])
async def completions(body: o.CompletionRequest, compat: OpenAI, request: Request) -> o.CompletionResponse:
    """vLLM's completions for scoring: `prompt_logprobs`, or `echo` with `logprobs`; `max_tokens` 0 or 1."""
    with request.app.state.admission.slot():
        return await until_disconnect(request, compat.complete(body))


@router.post("/generate", tags=["sglang-compatible"], response_model_exclude_none=True)
async def generate(body: s.GenerateRequest, compat: SGLang, request: Request) -> s.GenerateOutput | list[s.GenerateOutput]:
    """SGLang's /generate for scoring: `return_logprob` with `max_new_tokens` 0; one item or a batch."""
    with request.app.state.admission.slot():
        return await until_disconnect(request, compat.generate(body))
