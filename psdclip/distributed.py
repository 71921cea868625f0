"""Rank helpers and the gathers the loss and the pair memory share: every rank sees the whole global batch."""

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.14 renamed the tensor collectives (the old names warn); the GPU machines' torch 2.11 has only the old ones
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the sum over ranks of the gradient of its own part (what
    open_clip's ``gather_with_grad`` does), written on the stable ``torch.distributed`` API: the autograd gather of
    ``torch.distributed.nn`` is deprecated."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, len(tensor)
        gathered = tensor.new_empty((world * len(tensor), *tensor.shape[1:]))
        all_gather_single(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:  # one reduce-scatter moves 1/W of an all-reduce's data
            own = grad.new_empty((ctx.rows, *grad.shape[1:]))
            reduce_scatter_single(own, grad)
            return own
        grad = grad.clone()  # gloo has no reduce-scatter
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather(tensor: Tensor, grad: bool) -> Tensor:
    """``tensor`` of every rank concatenated along the first dimension (itself in a single process); with ``grad``,
    gradients flow back to each rank's own part. Every rank must pass the same number of rows."""
    if rank_and_world()[1] == 1:
        return tensor
    if grad:
        return _GatherWithGrad.apply(tensor)
    gathered = tensor.new_empty((rank_and_world()[1] * len(tensor), *tensor.shape[1:]))
    all_gather_single(gathered, tensor.contiguous())
    return gathered


def mean_over_ranks(value: Tensor) -> Tensor:
    if rank_and_world()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / rank_and_world()[1]
