"""A training-speed Mamba1 selective scan: the reference's math with a hand-written backward pass.

The reference scan (`ssmq.ops.scan.selective_scan`) writes each step's state into a slice of one
tensor, which autograd differentiates with a full-tensor copy per step and a Python-level graph
node per op. On a GPU that is launch-bound. Here the recurrence h[t] = dA[t] * h[t-1] + dBu[t]
runs under one autograd node, one kernel per step forward and three per step backward. Only the
fixture training uses it; evaluation and everything else use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssmq.ops.scan import discretize_dt


class _LinearRecurrence(torch.autograd.Function):
    """states[:, t] = dA[:, t] * states[:, t-1] + dBu[:, t], from h0; all (b, l, d, n) fp32."""

    @staticmethod
    def forward(ctx, dA: torch.Tensor, dBu: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        states = torch.empty_like(dBu)
        h = h0
        for t in range(dA.shape[1]):
            h = torch.addcmul(dBu[:, t], dA[:, t], h, out=states[:, t])
        ctx.save_for_backward(dA, states, h0)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        dA, states, h0 = ctx.saved_tensors
        grad_dA = torch.empty_like(dA)
        grad_dBu = torch.empty_like(dA)
        carry = torch.zeros_like(h0)
        for t in range(dA.shape[1] - 1, -1, -1):
            g = torch.add(grad_states[:, t], carry, out=grad_dBu[:, t])   # dL/dh[t] = dL/d dBu[t]
            torch.mul(g, states[:, t - 1] if t > 0 else h0, out=grad_dA[:, t])
            carry = g * dA[:, t]
        return grad_dA, grad_dBu, carry


class TrainSelectiveScan(nn.Module):
    """Drop-in for `ssmq.models.layers.SelectiveScan` (same call, same result up to fp32 rounding)."""

    def forward(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        dt = discretize_dt(delta, delta_bias, softplus=True)
        uf = u.float()
        dA = torch.exp(dt.unsqueeze(-1) * A.float())
        dBu = (dt * uf).unsqueeze(-1) * B.float().unsqueeze(2)
        h0 = dA.new_zeros(dA.shape[0], dA.shape[2], dA.shape[3]) if state is None else state.float()
        states = _LinearRecurrence.apply(dA, dBu, h0)
        y = torch.einsum("bldn,bln->bld", states, C.float()) + uf * D.float()
        y = y * F.silu(z.float())
        return y.to(u.dtype), states[:, -1]


def use_train_scan(model: nn.Module) -> None:
    """Swap every Mamba1 mixer's scan module for `TrainSelectiveScan` (parameters are untouched)."""
    for block in model.backbone.layers:
        block.mixer.scan = TrainSelectiveScan()
