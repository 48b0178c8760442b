"""The hf student's decode step on CUDA: a fixed-size KV cache and one CUDA graph per batch shape.

On a GPU a small model's decode step is bound by launching its kernels, not
by running them (a 32-layer model launches several hundred per token). A
captured CUDA graph replays them all in one launch. Choices:
1) The KV cache is ours (`StaticKV`): one [B, kv heads, L, head dim] buffer
   per layer, written where a device tensor says, so the write is part of
   the graph and no step needs the host. It has the one method the model's
   attention calls (`update`); the attention mask is always passed as a
   ready 4D boolean mask, so transformers never asks the cache for lengths.
2) `L` (prompt width + max_tokens) is rounded up to a multiple of
   `LENGTH_STEP`, so requests whose prompts differ a little share a graph.
3) The prompt is prefilled eagerly through the same cache (left padding:
   padded query rows attend to themselves only, so no row is all masked);
   then every decode step is a graph replay: mask the new position in,
   forward one token per row, advance the position. The draw of the next
   token stays outside the graph (services/student/sampling.py), so seeded
   requests keep their own draws.
4) A graph holds the addresses of the weights it was captured with: one
   captured for an older version is captured again, once, on the next
   request after a swap. A request keeps its graph (and the weights it was
   captured with) until it finishes: a graph serves one request at a time.
5) Capture runs on the engine's worker thread in thread-local mode, so a
   weight swap loading on another thread meanwhile is no error. Each graph
   has its own memory pool: a pool shared by graphs cannot be captured into
   again once its graphs are gone while its tensors live (torch 2.11 stops
   at an internal assert), and one step's pool is small.
"""

from __future__ import annotations

import torch

LENGTH_STEP = 64


class StaticKV:
    """Keys and values of every layer in fixed buffers; `at` holds the positions the next forward writes."""

    is_compileable = True

    def __init__(self, config, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.at = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.at, key_states)
        values.index_copy_(2, self.at, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked: positions and the mask are always given


class GraphDecoder:
    """One batch shape's cache, inputs, outputs and captured decode step."""

    def __init__(self, model: torch.nn.Module, batch: int, length: int, *, capture: bool = True) -> None:
        p = next(model.parameters())
        self.batch, self.length, self.capture = batch, length, capture
        self.kv = StaticKV(model.config, batch, length, p.dtype, p.device)
        self.ids_B1 = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.pos_B1 = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.attend_BL = torch.zeros(batch, length, dtype=torch.bool, device=p.device)
        self.at_1 = torch.zeros(1, dtype=torch.long, device=p.device)  # the position a decode step writes
        self.model: torch.nn.Module | None = None  # the weights the graph was captured with
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_BV: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, model: torch.nn.Module, ids_BW: torch.Tensor, mask_BW: torch.Tensor) -> torch.Tensor:
        """Writes the prompts' keys and values at positions 0..W-1; returns each row's next-token logits."""
        batch, width = ids_BW.shape
        valid_BW = mask_BW.bool()
        self.attend_BL.zero_()
        self.attend_BL[:, :width] = valid_BW
        causal_WW = torch.ones(width, width, dtype=torch.bool, device=ids_BW.device).tril()
        eye_WW = torch.eye(width, dtype=torch.bool, device=ids_BW.device)
        mask_BWL = torch.zeros(batch, width, self.length, dtype=torch.bool, device=ids_BW.device)
        mask_BWL[:, :, :width] = (causal_WW & valid_BW[:, None, :]) | eye_WW
        positions_BW = (mask_BW.cumsum(-1) - 1).clamp(min=0)
        self.kv.at = torch.arange(width, device=ids_BW.device)
        out = model(input_ids=ids_BW, attention_mask=mask_BWL[:, None], position_ids=positions_BW,
                    past_key_values=self.kv, use_cache=True, logits_to_keep=1)
        self.kv.at = self.at_1
        self.at_1.fill_(width)
        self.pos_B1.copy_(positions_BW[:, -1:] + 1)
        if self.model is not model and self.capture:
            self._capture(model)
        self.model = model
        return out.logits[:, -1]

    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row; returns the logits of the next (a buffer the next step overwrites)."""
        self.ids_B1.copy_(token_B[:, None])
        if not self.capture:  # the same step without a graph: CPU tests check the cache and mask with it
            with torch.inference_mode():
                return self._forward()
        assert self.graph is not None and self.logits_BV is not None
        self.graph.replay()
        return self.logits_BV

    def _forward(self) -> torch.Tensor:
        assert self.model is not None
        self.attend_BL.index_fill_(1, self.at_1, True)
        logits = self.model(input_ids=self.ids_B1, attention_mask=self.attend_BL[:, None, None, :],
                            position_ids=self.pos_B1, past_key_values=self.kv, use_cache=True).logits[:, -1]
        self.at_1 += 1
        self.pos_B1 += 1
        return logits

    @torch.inference_mode()
    def _capture(self, model: torch.nn.Module) -> None:
        """Warms up on a side stream, captures one step, and puts the decoding state back as it was."""
        self.model, self.graph, self.logits_BV = model, None, None  # the old graph and its memory go
        saved = self.at_1.clone(), self.pos_B1.clone(), self.attend_BL.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits_BV = self._forward()
        self.graph = graph
        for buffer, value in zip((self.at_1, self.pos_B1, self.attend_BL), saved, strict=True):
            buffer.copy_(value)


class GraphPool:
    """The engine's graph decoders, at most `size` of them, each lent to one request at a time."""

    def __init__(self, size: int = 4, *, capture: bool = True) -> None:
        self.size, self.capture = size, capture
        self.idle: list[GraphDecoder] = []
        self.failed = False  # a capture failed: the engine decodes without graphs from then on

    @staticmethod
    def length(width: int, max_tokens: int) -> int:
        return -(-(width + max_tokens) // LENGTH_STEP) * LENGTH_STEP

    def take(self, model: torch.nn.Module, batch: int, length: int) -> GraphDecoder:
        """An idle decoder of this shape, or a new one (the oldest idle decoder dropped beyond `size`)."""
        for i, decoder in enumerate(self.idle):
            if (decoder.batch, decoder.length) == (batch, length):
                return self.idle.pop(i)
        while len(self.idle) >= self.size:
            self.idle.pop(0)
        return GraphDecoder(model, batch, length, capture=self.capture)

    def give_back(self, decoder: GraphDecoder) -> None:
        self.idle.append(decoder)
