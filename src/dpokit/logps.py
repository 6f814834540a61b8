"""Per-token log-probabilities of given targets, without full-vocabulary logits.

A DPO step needs log p(target_t | prefix) only at completion positions. Materialising `[batch, seq, vocab]` logits
(and their softmax for backward) costs batch*seq*vocab*(2..4) bytes: for 16 x 1024 tokens and a 128k vocabulary that
is 8-16 GiB, more than the 1B model itself. So we

1. run the decoder to the final hidden states `h` ([B, T, H]),
2. keep only the positions whose next token is a completion token ([M, H], M << B*T for long prompts), and
3. apply the LM head chunk by chunk, keeping per token only the target logit and the log-sum-exp; backward recomputes
   each chunk's logits instead of storing them (`_ChunkedTargetLogps`).

Peak extra memory is one chunk of logits, `chunk_size * vocab` floats, whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dpokit.models import base_model


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
                  softcap: Optional[float]) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per row, computed and differentiated one chunk of rows at a time.

    Shapes: hidden [M, H], weight [V, H], bias [V] or None, targets [M] -> token_logps [M] (float32), and, when
    `with_sq` is set, also log sum_v p_v^2 [M] (WPO's weight term; not differentiated).

    Gradient (for one row, p = softmax(z), z = scale * (hW^T + b) before soft-capping):
        d logp[y] / d z = onehot(y) - p
    chained through soft-capping (d cap(z)/dz = 1 - tanh^2(z/c)) and the linear map.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, with_sq):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        sq = torch.empty_like(out) if with_sq else None
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                logits = _chunk_logits(hidden[start:end], weight, bias, scale, softcap)
                lse = torch.logsumexp(logits, dim=-1)
                out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse
                if with_sq:
                    sq[start:end] = torch.logsumexp(2 * logits, dim=-1) - 2 * lse
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        ctx.mark_non_differentiable(*([sq] if with_sq else []))
        return (out, sq) if with_sq else out

    @staticmethod
    def backward(ctx, grad_out, *unused):
        hidden, weight, bias, targets = ctx.saved_tensors
        scale, softcap = ctx.scale, ctx.softcap
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            raw = F.linear(h, weight, bias).float() * scale
            logits = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
            probs = torch.softmax(logits, dim=-1)
            # d out / d logits = onehot(target) - softmax, scaled by the incoming gradient of each row.
            g = -probs
            g.scatter_add_(1, targets[start:end, None], torch.ones_like(g[:, :1]))
            g.mul_(grad_out[start:end, None].float())
            if softcap is not None:
                g.mul_(1 - torch.tanh(raw / softcap) ** 2)
            if scale != 1.0:
                g.mul_(scale)
            if grad_hidden is not None:
                grad_hidden[start:end] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h.float())
            if grad_bias is not None:
                grad_bias.add_(g.sum(0))
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def target_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, *, chunk_size: int = 1024,
                 scale: float = 1.0, softcap: Optional[float] = None, with_sq: bool = False):
    """log p(targets) under `head` for each row of `hidden` ([M, H], [M] -> [M] float32), chunked.

    With `with_sq`, also returns log sum_v p_v^2 per row (detached), for WPO weights.
    """
    def apply(hidden, targets):
        return _ChunkedTargetLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, scale, softcap, with_sq)

    if hasattr(head.weight, "ds_id"):
        # DeepSpeed ZeRO-3 holds each rank's shard of the weight and gathers it in hooks around the module's forward
        # (and again before its backward): run the chunked head as `head`'s forward so that those hooks run.
        return _as_forward(head, apply, hidden, targets)
    return apply(hidden, targets)


def _as_forward(module: nn.Module, fn, *args):
    """`fn(*args)` called as `module`'s forward, so that the module's forward and backward hooks run around it."""
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear, float, Optional[float]]:
    """(decoder, lm_head, logit scale, logit soft-cap) of a causal LM, looking through peft and DDP wrappers."""
    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or decoder is base or not isinstance(head, nn.Linear):
        raise TypeError(f"{type(base).__name__} does not expose a decoder and a linear LM head "
                        "(get_decoder / get_output_embeddings); dpokit needs a standard causal LM")
    config = base.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return decoder, head, scale, softcap


@dataclass
class CompletionLogps:
    """Log-probs of the completion tokens of N sequences.

    logps: [N] summed log-probs; lengths: [N] completion-token counts; token_logps: [N, T-1] per-token log-probs at
    target positions (0 elsewhere; position t scores token t+1); weight_logps: [N] sum over completion tokens of
    log p_t - log sum_v p_v^2 (only when asked, for WPO).
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor
    mask: torch.Tensor
    weight_logps: Optional[torch.Tensor] = None


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                     chunk_size: int = 1024, with_weights: bool = False) -> CompletionLogps:
    """Log-probs of the tokens marked in `completion_mask` given everything before them.

    input_ids, attention_mask, completion_mask: [N, T] (right padding). Token t is scored from the hidden state at
    t-1, so the first token is never scored (it has no prefix).
    """
    decoder, head, scale, softcap = causal_lm_parts(model)
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][mask]
    picked = hidden[:, :-1][mask]  # [M, H]: only positions that predict a completion token
    result = target_logps(picked, head, targets, chunk_size=chunk_size, scale=scale, softcap=softcap,
                          with_sq=with_weights)
    token_lp, sq = result if with_weights else (result, None)
    token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    token_logps = token_logps.masked_scatter(mask, token_lp)
    weight_logps = None
    if with_weights:
        w = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, token_lp.detach() - sq)
        weight_logps = w.sum(-1)
    return CompletionLogps(logps=token_logps.sum(-1), lengths=mask.sum(-1), token_logps=token_logps, mask=mask,
                           weight_logps=weight_logps)

