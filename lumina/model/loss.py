"""The LM head fused with the cross-entropy, chunked over tokens: the [N, V] logits never exist whole.

Legend: N tokens (B * T flattened), D model dim, V vocabulary, C tokens per chunk.

``linear_cross_entropy(x_ND, head_DV, targets_N, ignore_index=, chunk=)`` returns the summed token
cross-entropy of ``x_ND @ head_DV`` and the number of correct argmax predictions (``hits``), over
the targets that are not ``ignore_index``. It walks N in chunks of ``chunk`` tokens; for each chunk
the forward pass computes the logits (in the head's dtype, then fp32: what the plain path's
``F.cross_entropy(logits.float())`` sees), their log-softmax, the chunk's loss and correct count,
and right away the chunk's gradients (the technique of Liger's fused linear cross-entropy;
torchtune's chunked loss chunks the same way but leaves the backward to autograd, which keeps every
chunk's logits):

    dlogits_CV = softmax(logits_CV) - onehot(targets_C)      (0 on ignored rows; fp32)
    grad_x_CD  = dlogits_CV @ head_DV^T                      (the chunk's rows of grad_x)
    grad_head += x_CD^T @ dlogits_CV                         (fp32 accumulator [D, V])

so what survives the forward is grad_x [N, D] and grad_head [D, V] (both fp32), never N x V: at the
``debug`` preset's shapes (N = 1024, V = 50304) the plain path keeps the fp32 logits and builds their
gradient, 206 MB each per micro-batch. The backward only multiplies the two saved gradients by the
incoming (scalar) gradient of the loss sum and casts them to the inputs' dtypes. The matmuls run in
the inputs' dtype (bf16 in bf16 training: tensor-core GEMMs, fp32 accumulation inside them), the
softmax and the accumulators in fp32.

The chunk's epilogue (max, correct count, log-sum-exp, loss, softmax - onehot) is, on the CPU, one
native kernel (``lumina_native::xent_rows_``, kernels/csrc/xent_ops.cpp) that makes three passes
over each row while it is in cache, in place on the chunk's logits (eager, and called as an opaque
op by compiled graphs); bf16 logits are widened row by row inside it and their gradient rounded back
in place, so bf16 training moves no fp32 [C, V] copy (the same bits as ``.float()`` before it and
``.to(torch.bfloat16)`` after). CUDA tensors and ``LUMINA_OPS=reference`` take the torch ops. The two agree
to float rounding (tests/test_loss.py). The head's gradient is accumulated in the head's memory
layout (a tied head's is the embedding's [V, D]).

Differentiation: an ``autograd.Function`` with ``setup_context`` (``torch.func.grad`` needs it, see
``lumina_kernels._autograd``), reached through a module global and applied with ``_autograd.apply``
(the view trick); its outputs are (ce_sum, correct, grad_x, grad_head), the last three
non-differentiable, and ``linear_cross_entropy`` returns the first two. No second derivative. Works
under ``torch.func.grad_and_value`` and ``torch.compile(fullgraph=True)`` (tests/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lumina import ops
from lumina_kernels import native
from lumina_kernels._autograd import apply as _apply

__all__ = ["hits", "linear_cross_entropy", "plain_cross_entropy", "token_nll"]


def token_nll(
    logits_CV: torch.Tensor, targets_C1: torch.Tensor, keep_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([C] each row's negative log-likelihood of its target, 0 where not kept; [C, V] the
    log-probabilities). ``log_softmax`` is one fused kernel per row (max, sum of exp, write); a
    logsumexp and a subtraction would each sweep the [C, V] chunk through memory again."""
    logp_CV = torch.log_softmax(logits_CV, dim=-1)
    return torch.where(keep_C, -logp_CV.gather(1, targets_C1)[:, 0], 0.0), logp_CV


def hits(logits_CV: torch.Tensor, targets_C1: torch.Tensor, keep_C: torch.Tensor) -> torch.Tensor:
    """[C] bool: the target's logit is the row's largest (a tie counts) and the row is kept — the
    "correct argmax" of the accuracy metric. A max and a gather instead of ``argmax(-1) == target``:
    torch's CPU argmax costs ~3x a max over the same [C, V] chunk (measured at C=128, V=50304)."""
    return (logits_CV.gather(1, targets_C1)[:, 0] >= logits_CV.amax(-1)) & keep_C


# The native epilogue (``lumina_native::xent_rows_``, kernels/csrc/xent_ops.cpp) takes CPU chunks
# when built and not forced off (``LUMINA_OPS=reference``). Compiled graphs call it too (an opaque op
# with a fake kernel), so a compiled step computes the same numbers as the eager one.
_NATIVE_ROWS = ops.provider() == "native" and native.has_op("xent_rows_")
_NATIVE_ROWS_DTYPES = (torch.float32, torch.bfloat16)  # the logits it reads (and the gradient it writes)
_NATIVE_ADD = _NATIVE_ROWS and native.has_op("add_bf16_")  # fp32 += bf16 in one pass (the bf16 head's grad)


def _forward(x_ND, head_DV, targets_N, ignore_index, chunk, grads=True):
    N = x_ND.shape[0]
    C = N if chunk <= 0 else chunk
    ce_sum = torch.zeros((), dtype=torch.float32, device=x_ND.device)
    correct = torch.zeros((), dtype=torch.int64, device=x_ND.device)
    grad_head = None  # the first chunk's product starts it: no zero-filled [D, V] to add onto
    # accumulated in the head's own layout: a tied head is the embedding transposed ([V, D] memory),
    # and its gradient then meets the embedding's gradient, and the optimizer, without a transpose
    transposed = not head_DV.is_contiguous() and head_DV.T.is_contiguous()
    native_rows = _NATIVE_ROWS and x_ND.device.type == "cpu" and head_DV.dtype in _NATIVE_ROWS_DTYPES
    grad_x = []
    for s in range(0, N, C):
        x_CD, t_C = x_ND[s : s + C], targets_N[s : s + C]
        logits_CV = x_CD @ head_DV  # the matmul in the head's dtype; the loss is computed in fp32
        keep_C = t_C != ignore_index
        safe_C = torch.where(keep_C, t_C, torch.zeros_like(t_C))[:, None]  # ignored rows gather column 0
        keep_C1 = keep_C.float()[:, None]
        if native_rows:  # the epilogue below in one kernel, in place (bf16 rows widened inside it)
            nll_C, hits_C = torch.ops.lumina_native.xent_rows_(logits_CV, safe_C[:, 0], keep_C, grads)
            correct, ce_sum = correct + hits_C.sum(), ce_sum + nll_C.sum()
            if not grads:
                continue
            d_CV = logits_CV  # softmax - onehot, in the head's dtype
        else:
            logits_CV = logits_CV.float()  # as the plain path
            correct = correct + hits(logits_CV, safe_C, keep_C).sum()
            nll_C, logp_CV = token_nll(logits_CV, safe_C, keep_C)
            del logits_CV
            ce_sum = ce_sum + nll_C.sum()
            if not grads:
                continue
            # in place on the chunk's log-probabilities (nothing else reads them now): one [C, V]
            # buffer. Ignored rows are zeroed on the [C, D] sides (x's rows for grad_head, grad_x's
            # rows), not on the [C, V] one: a sweep of the chunk less
            d_CV = logp_CV.exp_().scatter_add_(1, safe_C, -keep_C1).to(head_DV.dtype)  # softmax - onehot
        grad_x.append((d_CV @ head_DV.T) * keep_C1)  # fp32 (bf16 widened inside the multiply)
        xk_CD = x_CD * keep_C1.to(x_CD.dtype)
        a, b = (d_CV.T, xk_CD) if transposed else (xk_CD.T, d_CV)  # [V, D] or [D, V]
        if grad_head is None:
            grad_head = (a @ b).float()
        elif head_DV.dtype == torch.float32:
            grad_head = grad_head.addmm_(a, b)
        elif _NATIVE_ADD and native_rows and head_DV.dtype == torch.bfloat16:
            torch.ops.lumina_native.add_bf16_(grad_head, a @ b)  # widened as it is added
        else:  # the product widened inside the add (the same sums as .float() first)
            grad_head = grad_head.add_(a @ b)
    if not grads:
        return ce_sum, correct, None, None
    if grad_head is None:  # no rows
        grad_head = torch.zeros(head_DV.T.shape if transposed else head_DV.shape, device=x_ND.device)
        grad_x = [torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)]
    return ce_sum, correct, torch.cat(grad_x), (grad_head.T if transposed else grad_head)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(x_ND, head_DV, targets_N, ignore_index, chunk):
        return _forward(x_ND, head_DV, targets_N, ignore_index, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_ND, head_DV = inputs[0], inputs[1]
        _, correct, grad_x_ND, grad_head_DV = output
        ctx.mark_non_differentiable(correct, grad_x_ND, grad_head_DV)
        ctx.set_materialize_grads(False)  # the three unused outputs' gradients stay None, not zeros
        ctx.save_for_backward(grad_x_ND, grad_head_DV)
        ctx.dtypes = (x_ND.dtype, head_DV.dtype)

    @staticmethod
    def backward(ctx, g_ce, g_correct, g_grad_x, g_grad_head):
        grad_x_ND, grad_head_DV = ctx.saved_tensors
        x_dtype, head_dtype = ctx.dtypes
        if g_ce is None:  # the loss sum unused: no gradient
            return None, None, None, None, None
        return (grad_x_ND * g_ce).to(x_dtype), (grad_head_DV * g_ce).to(head_dtype), None, None, None


def linear_cross_entropy(
    x_ND: torch.Tensor,
    head_DV: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    ignore_index: int,
    chunk: int,
    differentiable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce_sum, correct): the summed cross-entropy of the logits ``x_ND @ head_DV`` (computed ``chunk``
    tokens at a time, fp32 softmax) against ``targets_N``, and the count of rows whose argmax equals the
    target; rows whose target is ``ignore_index`` count in neither. ce_sum is fp32 and differentiable
    w.r.t. ``x_ND`` and ``head_DV``; correct is int64. ``chunk`` <= 0 means one chunk of all N rows.
    ``differentiable=False`` (evaluation): no gradients are computed, ce_sum carries none."""
    if not differentiable:
        with torch.no_grad():
            ce_sum, correct, _, _ = _forward(x_ND, head_DV, targets_N, ignore_index, chunk, grads=False)
        return ce_sum, correct
    ce_sum, correct, _, _ = _apply(_LinearCrossEntropy, x_ND, head_DV, targets_N, ignore_index, chunk)
    return ce_sum, correct


def plain_cross_entropy(
    x_ND: torch.Tensor, head_DV: torch.Tensor, targets_N: torch.Tensor, *, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two numbers through the full [N, V] logits and autograd (``train.loss_chunk=0``)."""
    logits_NV = x_ND @ head_DV
    ce_sum = F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index, reduction="sum")
    keep_N = targets_N != ignore_index
    safe_N1 = torch.where(keep_N, targets_N, torch.zeros_like(targets_N))[:, None]
    correct = hits(logits_NV.detach(), safe_N1, keep_N).sum()
    return ce_sum, correct
