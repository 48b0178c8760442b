"""The student's vLLM engine: AsyncLLM sampling with live policy swaps.

Choices:
1) `logprobs_mode="processed_logprobs"`: vLLM reports the logprob of each
   sampled token after temperature and top-p, the distribution it was drawn
   from (its default is the raw model distribution).
2) One engine request per prompt with `n` samples, all prompts at once, so
   concurrent HTTP requests share batches through continuous batching.
   `FINAL_ONLY` output: the n samples arrive together when all are done.
3) Seeds: rollout j of prompt i is seeded `seed + i*n + j` (vLLM seeds the
   n samples of one request `seed + j`), so every rollout of a request has
   its own stream, independent of batching.
4) A LoRA version is registered with `add_lora` at swap time (its load time
   is the swap's, and the first rollout pays nothing) and then named in every
   request; the previous adapter is removed. A full version is reloaded in
   place (`reload_weights`), which also drops any adapter, and the prefix
   cache is emptied: cached keys and values belong to the old weights.
   With `merge_lora` (the default without a GPU) the engine runs without
   LoRA support and a LoRA version is merged into the weights in place
   instead (vllm_merge.py): sampling keeps plain-weight speed.
5) Greedy requests (temperatures below the floor, 0 included) run once and are
   copied n times: vLLM allows n = 1 only, and greedy samples are all the
   same. Their logprobs are vLLM's for greedy requests: the model's at
   temperature 1, without top-p.
6) vLLM's engine dies on a bad adapter or checkpoint, so checkpoints are
   checked before they get here (checkpoints.py); if it dies anyway,
   `healthy()` turns false: the service answers 503 and exits
   (services/common/engine_watch.py).
7) A request vLLM refuses (its own validation) is the request's fault: a 422
   with vLLM's message, never a 500.
8) Without a GPU, prompts are prefilled whole (`enable_chunked_prefill=False`;
   vLLM then raises the step's token budget to max_model_len). vLLM 0.32's CPU
   build kills its engine when a seeded request's prefill is split across
   steps (a CPU generator has no offset to rewind), which any batch of
   prompts over 2048 tokens in all did (64 held-out prompts of 130 tokens).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from pathlib import Path

from opd.common.errors import InvalidInput
from opd.common.settings import StudentSettings
from opd.student.checkpoints import local_model_folder
from opd.common.vllm_args import build_async_llm, on_gpu
from opd.student.engine import RolloutEngine, Sample, Sampling, cut_text
from opd.student.sampling import is_greedy


class VLLMRolloutEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, settings: StudentSettings) -> None:
        super().__init__(settings)
        self.merge = settings.enable_lora and settings.merge_lora
        self.lora_patterns = not self.merge  # vllm_merge.py applies one rank and alpha to every layer
        if self.merge:
            lora = {"worker_extension_cls": "opd.student.vllm_merge.MergeLoRA"}
        elif settings.enable_lora:
            lora = {"enable_lora": True, "max_lora_rank": settings.max_lora_rank, "max_loras": 1}
        else:
            lora = {}
        whole_prompts = {} if on_gpu() else {"enable_chunked_prefill": False}  # choice 8
        self.llm = build_async_llm(settings, logprobs_mode="processed_logprobs", **lora, **whole_prompts)
        self.serving_dir = str(local_model_folder(settings.model))  # the full weights a LoRA version applies to
        config = self.llm.model_config
        self.vocab_size = min(config.get_vocab_size(), len(self.tokenizer))
        self.max_model_len = config.max_model_len
        self.lora = None  # the LoRARequest of the serving version, if it is an adapter
        self._ids = itertools.count()

    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def sample(self, prompts_P: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        return list(await asyncio.gather(*(self._sample_one(i, ids, sampling) for i, ids in enumerate(prompts_P))))

    async def _sample_one(self, index: int, prompt: list[int], sampling: Sampling) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        greedy = is_greedy(sampling.temperature)  # vLLM refuses n > 1 for greedy requests: the n samples are one
        params = SamplingParams(
            n=1 if greedy else sampling.n, max_tokens=sampling.max_tokens, temperature=0.0 if greedy else sampling.temperature,
            top_p=sampling.top_p,
            seed=None if sampling.seed is None else sampling.seed + index * sampling.n,
            stop=list(sampling.stop) or None, logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=bool(sampling.stop),  # vLLM needs text only to find stop strings
        )
        final = None
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=prompt), params, request_id=f"rollout-{next(self._ids)}", lora_request=self.lora
            ):
                final = out
        except VLLMClientError as exc:
            raise InvalidInput(f"prompts[{index}]: the student's vLLM engine refused it: {exc}") from exc
        assert final is not None
        samples = [self._to_sample(c, sampling.stop) for c in sorted(final.outputs, key=lambda c: c.index)]
        return [copy.deepcopy(samples[0]) for _ in range(sampling.n)] if greedy else samples

    def _to_sample(self, completion, stop: tuple[str, ...]) -> Sample:
        tokens = list(completion.token_ids)
        # With logprobs=0 each position holds the sampled token (and nothing else).
        logprobs = [float(pos[t].logprob) for t, pos in zip(tokens, completion.logprobs, strict=True)]
        reason = "length" if completion.finish_reason == "length" else "stop"
        # The text is decoded here as in the hf engine: vLLM's incremental text drops a trailing partial character.
        text = cut_text(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)
        return Sample(tokens, logprobs, reason, text)

    async def load_full(self, folder: Path) -> None:
        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        await self.llm.reset_prefix_cache()
        self.lora = None  # reload_weights removed every adapter
        self.serving_dir = str(folder)
        if self.merge:
            await self.llm.collective_rpc("opd_forget_merged")

    async def load_lora(self, folder: Path, version: int) -> None:
        from vllm.lora.request import LoRARequest

        if self.merge:
            await self.llm.collective_rpc("opd_merge_lora", args=(str(folder), self.serving_dir))
            await self.llm.reset_prefix_cache()
            return
        request = LoRARequest(f"policy-v{version}", version, str(folder))
        await self.llm.add_lora(request)
        previous, self.lora = self.lora, request
        if previous is not None:
            await self.llm.remove_lora(previous.lora_int_id)

    async def close(self) -> None:
        # Drop the last reference while the interpreter is whole: AsyncLLM's finaliser fails at exit otherwise.
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
