"""The epoch's loss sums and first non-finite step, kept on the device between host reads."""

from __future__ import annotations

from typing import cast

import torch


class LossTally:
    """The epoch's loss sums and its first non-finite step, kept on the device.

    On a GPU each `float(loss)` or finiteness test is a wait for the device; here a step adds
    its losses and notes whether they are finite without leaving the device, and the host
    reads everything in one copy (`read`) where it prints or checks: every `log_every` steps
    and at the epoch's end. Every worker reads at the same steps, so all stop at the same
    step, and the message still names the first non-finite iteration and its loss terms."""

    def __init__(self, device: torch.device) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)  # -1: all finite so far
        self.bad_values: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Count one step's losses; whether they are all finite (a device tensor)."""
        if not self.names:
            self.names = ["loss", *losses]
        # float64, as the host's sums were: a long epoch's sum keeps its digits
        values = torch.stack([loss.detach().double(), *(losses[k].detach().double() for k in self.names[1:])])
        finite = torch.isfinite(values).all()
        first = (~finite) & (self.bad_step < 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_values = values if self.bad_values is None else torch.where(first, values, self.bad_values)
        self.sums = values if self.sums is None else self.sums + values
        return finite

    def read(self) -> tuple[dict[str, float], int | None, bool]:
        """(sums by name, the first non-finite step on any worker or None, whether it was
        this worker's), after one all-reduce across workers and one copy to the host."""
        import torch.distributed as dist

        if self.sums is None:
            return {}, None, False
        never = 2**52  # exact as a double, past any step
        own = torch.where(self.bad_step < 0, torch.full_like(self.bad_step, never), self.bad_step)
        first = own.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        host = torch.cat([self.sums.double(), own.double().view(1), first.double().view(1)]).tolist()
        sums = dict(zip(self.names, host[:-2]))
        mine, any_worker = int(host[-2]), int(host[-1])
        if any_worker == never:
            return sums, None, False
        return sums, any_worker, mine == any_worker

    def bad_detail(self) -> str:
        """This worker's loss terms at its first non-finite step (read after `read` found one)."""
        values = cast(torch.Tensor, self.bad_values).tolist()
        detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names[1:], values[1:]))
        return f"total={values[0]} ({detail})"
