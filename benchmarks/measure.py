"""Timing and peak memory of one step, the same way for every contender and on every device.

Time: wall clock around ``inner`` steps (CUDA synchronised before and after), contenders alternated round by round
in a rotating order, medians reported. Memory: the bytes a contender keeps (parameters, buffers, optimiser state,
inputs: its *resident* memory) plus the highest extra allocation during one step (its *step peak*). The step peak
is read from the allocator: on CUDA ``max_memory_allocated`` after a reset, minus what was allocated at the step's
start; on the CPU from the profiler's allocation events (``profile_memory=True``), whose running total starts at
zero when profiling starts, so its maximum is exactly the step's extra peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, inner: int) -> float:
    """Seconds per step, averaged over ``inner`` back-to-back steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        step()
    sync(device)
    return (time.perf_counter() - start) / inner


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages a contender holds between steps (gradients are not: each step makes them)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for t in (*model.parameters(), *model.buffers(), *tensors):
        add(t)
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                add(t)
    return sum(seen.values())


def step_peak_bytes(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Highest allocation above the step's starting point during one ``step()``; clear gradients first."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []  # (time, bytes allocated (+) or freed (-), running total after it)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(event.children)
    if not events:
        return 0
    events.sort()
    # The running total may start above zero (blocks allocated under an earlier profiler and freed outside one).
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start
