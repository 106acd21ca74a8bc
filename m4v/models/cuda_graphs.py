"""CUDA graphs for generation (issue 5): one captured transformer forward per input shape, replayed per step.

Below a few thousand tokens a forward of the paper-scale model is host-bound: the GPU waits for Python to launch a
few thousand small kernels. A pyramid generation runs every (frame, stage) shape for 10-20 Euler steps, so the
launches of one step are captured once and replayed for the rest of the stage. Capturing costs about one more
host pass plus the graph's instantiation, so larger shapes, where the GPU is busy anyway, run eagerly
(``graph_token_limit``; measured on an H100, docs/performance.md).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from m4v.models.blocks import SequenceContext
from m4v.models.transformer import M4VTransformer


def cuda_graphs_enabled(requested: bool | None, model: torch.nn.Module) -> bool:
    """Whether a generation should replay CUDA graphs: on CUDA by default, off with ``M4V_CUDA_GRAPHS=0``.

    Off for models that are not an ``M4VTransformer`` on one CUDA device, or whose weights move between forwards
    (accelerate offload hooks, FSDP-sharded parameters). ``requested=True`` where graphs cannot run is an error.
    """
    params = list(model.parameters())
    on_cuda = bool(params) and all(p.is_cuda for p in params) and len({p.device for p in params}) == 1
    sharded = any(type(p.data).__name__ == "DTensor" for p in params)  # FSDP2: weights gathered per forward
    capable = isinstance(model, M4VTransformer) and on_cuda and not sharded and not hasattr(model, "_hf_hook")
    if requested is None:
        return capable and os.environ.get("M4V_CUDA_GRAPHS", "1") != "0"
    if requested and not capable:
        raise ValueError("cuda_graphs: needs the M4V transformer on one CUDA device (no offload hooks, no FSDP)")
    return bool(requested)


def graph_token_limit(width: int) -> int:
    """Largest sequence (text + video tokens) captured by default: 4,096 at width 1920, the measured crossover of
    the m4v-768p model on an H100; GPU work per token grows with width squared, host work does not."""
    return int(4096 * (1920 / width) ** 2)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # [hidden_states, timestep, *history], read by the graph
    output: torch.Tensor  # written by every replay
    context: SequenceContext  # its index plans, RoPE tables and mask are read by the graph: kept alive with it


class CUDAGraphTransformer:
    """``model(x, t, text..., history=...)`` through one CUDA graph per input shape, for fixed text inputs.

    The text inputs (one generation's prompt batch) are fixed at construction; per call the noisy frame, the
    timestep and the history change. The first call of a shape runs the model eagerly on a side stream (the
    warm-up capture needs; its result is returned) and captures the same forward; later calls copy their inputs
    into the graph's buffers and replay it. The ``max_graphs`` most recently used graphs are kept: a pyramid
    generation meets its shapes in order, so each graph serves one stage (two with self-quality guidance).
    Shapes of more than ``max_tokens`` tokens (default ``graph_token_limit(width)``) run eagerly.
    """

    def __init__(
        self,
        model: M4VTransformer,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        max_graphs: int = 2,
        max_tokens: int | None = None,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs: must be >= 1, got {max_graphs}")
        cuda_graphs_enabled(True, model)
        self.model = model
        self.text = (encoder_hidden_states, pooled_projections, encoder_attention_mask)
        self.max_graphs = max_graphs
        self.max_tokens = graph_token_limit(model.config.width) if max_tokens is None else max_tokens
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.num_captures = 0

    def _forward(self, inputs: Sequence[torch.Tensor], ctx: SequenceContext) -> torch.Tensor:
        x, t, *history = inputs
        txt, pooled, mask = self.text
        return self.model(x, t, txt, pooled, mask, history=history, return_dict=False, context=ctx)[0]

    def uses_graph(self, hidden_states: torch.Tensor, history: Sequence[torch.Tensor] = ()) -> bool:
        """Whether inputs of these shapes go through a graph (else an eager forward)."""
        grids = self.model.token_grids(hidden_states, history)
        return self.text[0].shape[1] + sum(h * w for h, w in grids) <= self.max_tokens

    @torch.no_grad()
    def __call__(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, history: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        if not self.uses_graph(hidden_states, history):
            txt, pooled, mask = self.text
            return self.model(hidden_states, timestep, txt, pooled, mask, history=history, return_dict=False)[0]
        inputs = [hidden_states, timestep, *history]
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in inputs)
        with torch.cuda.device(hidden_states.device):  # streams and capture on the model's GPU, not the current one
            entry = self.graphs.get(key)
            if entry is None:
                return self._capture(key, inputs)
            self.graphs.move_to_end(key)
            for buf, a in zip(entry.inputs, inputs):
                buf.copy_(a)
            entry.graph.replay()
            return entry.output.clone()

    def _capture(self, key: tuple, inputs: list[torch.Tensor]) -> torch.Tensor:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)  # frees the oldest graph's memory pool
        static = [a.clone() for a in inputs]
        ctx = self.model.sequence_context(self.model.token_grids(static[0], static[2:]), self.text[2])
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._forward(static, ctx)  # warm-up (lazy kernel set-up, plans cached in ctx): this call's result
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self._forward(static, ctx)
        self.graphs[key] = _Graph(graph, static, output, ctx)
        self.num_captures += 1
        return out
