"""Process-wide CUDA math settings of a training run (``cuda:`` in conf/train.yaml)."""

import torch


def apply_cuda_settings(float32_matmul_precision: str = "highest", cudnn_benchmark: bool = False) -> None:
    """``high``: float32 matmuls on TF32 tensor cores (bf16-mixed runs keep fp32 parts: the loss, norms); cuDNN picks
    the fastest convolution algorithm per shape (ResNets; fixed input sizes). Nothing happens without a GPU."""
    if not torch.cuda.is_available():
        return
    torch.set_float32_matmul_precision(float32_matmul_precision)
    torch.backends.cudnn.benchmark = cudnn_benchmark
