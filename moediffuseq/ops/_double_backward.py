"""Backward ops that are not differentiable themselves: their autograd registration raises a
clear error when a gradient of the gradient is asked for (``create_graph=True`` and a second
backward), where PyTorch would otherwise return zeros without a word."""
import torch


def refuse_double_backward(op: str, forward: str) -> None:
    """Registers autograd for ``moediffuseq::<op>`` (the backward of ``forward``) that refuses."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{forward}: double backward is not supported (a gradient of its gradient was "
                           "requested, e.g. by torch.autograd.grad(..., create_graph=True) and a second backward)")

    torch.library.register_autograd(f"moediffuseq::{op}", backward, setup_context=setup_context)
