"""The teacher as an SGLang server, for scoring: POST /generate with max_new_tokens 0.

A GenerateRequest (one item or a batch) becomes score jobs on the
TeacherService (the same limits, engine batching and counters as /logprobs),
and the scores come back as SGLang's `meta_info` (layout in
services/common/sglang_protocol.py).

Choices:
1) With `logprob_start_len` s the job scores positions s+1 on: SGLang's first
   entry (ids[s]) carries a null logprob, so there is nothing to compute for
   it. s = -1 (the default) is the last input token: nothing to score at all.
2) `return_logprob` false still answers (with no logprobs), as SGLang does.
3) A batch's `rid` given as one string becomes "<rid>-<i>" per item; with no
   rid each item gets a fresh hex id.
"""

from __future__ import annotations

import time
import uuid

from opd.common import sglang_protocol as s
from opd.common.errors import InvalidInput, InvalidRequest
from opd.teacher.engine import ScoreJob, ScoreOutput
from opd.teacher.openai_compat import Decoder
from opd.teacher.serving import TeacherService

SCORING_ONLY = (
    "this teacher scores and does not generate: send sampling_params.max_new_tokens 0 with return_logprob "
    "(the teacher's own POST /logprobs scores token ids from a start position)"
)


class SGLangGenerate:
    def __init__(self, service: TeacherService) -> None:
        self.service = service
        self.tokenizer = service.engine.tokenizer

    def check(self, request: s.GenerateRequest) -> list[s.SamplingParams]:
        if request.stream:
            raise InvalidRequest(f"'stream' is not supported: {SCORING_ONLY}")
        params = request.per_item("sampling_params", s.SamplingParams())
        for i, sp in enumerate(params):
            where = f"sampling_params[{i}]" if request.is_batch else "sampling_params"
            new = 128 if sp.max_new_tokens is None else sp.max_new_tokens  # SGLang's default
            if new != 0:
                raise InvalidRequest(f"{where}.max_new_tokens {new}: {SCORING_ONLY}")
            if (sp.n or 1) != 1:
                raise InvalidRequest(f"{where}.n {sp.n}: {SCORING_ONLY}")
        return params

    async def generate(self, request: s.GenerateRequest) -> s.GenerateOutput | list[s.GenerateOutput]:
        began = time.perf_counter()
        self.check(request)
        items = request.items()
        want = request.per_item("return_logprob", False)
        starts = request.per_item("logprob_start_len", -1)
        tops = [k if w else 0 for k, w in zip(request.per_item("top_logprobs_num", 0), want, strict=True)]
        label = "text" if request.text is not None else "input_ids"

        def make_jobs() -> list[ScoreJob]:
            jobs = []
            for i, item in enumerate(items):
                ids = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
                where = f"{label}[{i}]" if request.is_batch else label
                if not ids:
                    raise InvalidInput(f"{where} encodes to no tokens: give a non-empty input")
                first = len(ids) - 1 if starts[i] == -1 else starts[i]
                if not 0 <= first < len(ids):
                    raise InvalidInput(
                        f"logprob_start_len {starts[i]} for {where} of {len(ids)} tokens: give -1 (the last token) "
                        f"or 0..{len(ids) - 1}"
                    )
                jobs.append(ScoreJob(ids, first + 1 if want[i] else len(ids)))
            self.service.check_jobs(jobs, label=label)
            return jobs

        jobs, outputs = await self.service.score(make_jobs, top_k=max(tops), endpoint="/generate")
        decode = Decoder(self.tokenizer) if request.return_text_in_logprobs else None
        rids = self.rids(request)
        answers = [
            self.answer(rids[i], job, out, want[i], tops[i], decode, time.perf_counter() - began)
            for i, (job, out) in enumerate(zip(jobs, outputs, strict=True))
        ]
        return answers if request.is_batch else answers[0]

    @staticmethod
    def rids(request: s.GenerateRequest) -> list[str]:
        n = len(request.items())
        if isinstance(request.rid, list):
            return request.per_item("rid", None)
        if request.rid is not None:
            return [f"{request.rid}-{i}" for i in range(n)] if request.is_batch else [request.rid]
        return [uuid.uuid4().hex for _ in range(n)]

    @staticmethod
    def answer(
        rid: str, job: ScoreJob, out: ScoreOutput, want: bool, top: int, decode: Decoder | None, latency: float
    ) -> s.GenerateOutput:
        meta = s.MetaInfo(
            id=rid, finish_reason={"type": "length", "length": 0}, prompt_tokens=len(job.token_ids),
            completion_tokens=0, cached_tokens=0, e2e_latency=latency,
        )
        if want:
            ids, first = job.token_ids, job.start - 1
            text = decode.token if decode else (lambda _: None)
            meta.input_token_logprobs = [(None, ids[first], text(ids[first]))] + [
                (lp, ids[job.start + j], text(ids[job.start + j])) for j, lp in enumerate(out.logprobs)
            ]
            meta.output_token_logprobs = []
            if top:
                assert out.top_logprobs is not None
                meta.input_top_logprobs = [None] + [[(lp, t, text(t)) for t, lp in pos[:top]] for pos in out.top_logprobs]
                meta.output_top_logprobs = []
        return s.GenerateOutput(meta_info=meta)
