"""Stochastic weight averaging (Izmailov et al. 2018): a running equal-weight mean of weights.

The trainer feeds it the member-averaged (plain) state dict every `swa.every` steps from
`swa.start` on; the average is then loaded into a plain model and evaluated as its own model.
Floating tensors are summed in float64, so the mean of n snapshots is exact to float64
rounding whatever n is; other tensors (integer buffers) keep the latest snapshot's value.
"""
from __future__ import annotations

import torch


class WeightAverage:
    """Equal-weight mean of the state dicts passed to `update`."""

    def __init__(self):
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    @torch.no_grad()
    def update(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.count and state_dict.keys() != self._sums.keys():
            missing = sorted(set(self._sums) ^ set(state_dict))
            raise ValueError(f"snapshot keys differ from the first snapshot's (e.g. {missing[0]}); average one architecture")
        for name, value in state_dict.items():
            value = value.detach()
            if not value.is_floating_point():
                self._sums[name] = value.clone()
            elif self.count == 0:
                self._sums[name] = value.to(torch.float64, copy=True)
            else:
                self._sums[name].add_(value.to(torch.float64))
            self._dtypes[name] = value.dtype
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no snapshots averaged yet: call update() first (is swa.start after the last step?)")
        return {
            name: (total / self.count).to(self._dtypes[name]) if total.is_floating_point() else total.clone()
            for name, total in self._sums.items()
        }

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": dict(self._sums), "dtypes": {k: str(v) for k, v in self._dtypes.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore a `state_dict`, with the sums on `device` (where the snapshots will come from)."""
        self.count = int(state["count"])
        self._sums = {name: total.to(device) for name, total in state["sums"].items()}
        self._dtypes = {k: getattr(torch, v.removeprefix("torch.")) for k, v in state["dtypes"].items()}
