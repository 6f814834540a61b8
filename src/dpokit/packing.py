"""Padding-free DPO batches: many pairs' chosen and rejected sequences packed into one row, optionally sharing the
prompt, with attention kept inside each sequence.

Why. A padded chosen-then-rejected batch runs every linear layer on B*T slots, of which HH-RLHF wastes more than half
on padding (56% at 8 pairs per batch, max_length 512: bench/hh_tokens.py), and runs each prompt twice (once with each completion). Packing runs them on the real tokens only; with
`shared_prompt` each prompt is run once (prompt‖chosen‖rejected, rejected's positions restarting at len(prompt)), which
on HH-RLHF (prompt p50 about 108 tokens, completions about 30-40) removes another ~40% of the tokens.

Exactness. Only attention mixes tokens, so only attention must know the layout. Transformers does not isolate packed
sequences for us in a way that is both exact and fast (given position ids alone it either lets them attend across each
other or builds a dense [N, N] block mask), so dpokit registers its own attention function, `dpokit_packed`, which
reads the layout (`collate_packed`'s `attn_index`/`attn_out`) and computes, per *segment* (one sequence as the model
would see it alone: prompt‖chosen, or prompt‖rejected reusing the shared prompt's keys and values), plain causal
attention:

- where the installed torch's `torch.nn.attention.varlen.varlen_attn` can compute it (CUDA, bf16/fp16, a torch
  whose varlen_attn takes a causal form, a head size Flash supports): Flash varlen over the concatenated segments,
  called the way that torch's signature allows (`packed_kernel`; the choice is announced once on CUDA).
- otherwise (CPU, float32, torch before 2.10, ...): the segments, sorted by length into a few buckets, gathered into
  right-padded [n, L] blocks, one causal `scaled_dot_product_attention` call per bucket. Right padding under a causal
  mask is exact for the real slots (a real query never sees a later pad slot); the pad slots' outputs are never read
  back.

Per-token values then equal the padded path's up to float reassociation (the same ops on differently shaped inputs):
see tests/test_packing.py for the tolerances.

Without a layout (an ordinary padded batch) the registered function is plain `sdpa`, with transformers' sdpa masks, so
a model switched to `dpokit_packed` still serves padded batches (evaluation, the plain reference path) unchanged.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpokit.data.collate import collate_packed, pair_tokens
from dpokit.errors import ConfigError
from dpokit.logps import CompletionLogps, causal_lm_parts, completion_logps, target_logps
from dpokit.metrics import log
from dpokit.models import base_model

ATTN_IMPLEMENTATION = "dpokit_packed"
LAYOUT_KWARG = "dpokit_packed_layout"

__all__ = ["ATTN_IMPLEMENTATION", "PackedLayout", "batch_logps", "collate_packed", "enable_packed_attention",
           "is_packed", "pack_pairs", "packed_completion_logps", "pair_tokens", "padded_tokens"]


# --------------------------------------------------------------------------------------------------------------------
# Length-aware micro-batches


def pack_pairs(pairs: Sequence, token_budget: int, shared_prompt: bool = False) -> list[list]:
    """Split `pairs` (one optimizer step's worth) into micro-batches of at most `token_budget` packed tokens.

    First-fit decreasing: the longest pairs are placed first, each into the first micro-batch with room, so budgets
    fill (a fixed pair count would leave short batches mostly empty and make long ones run out of memory). A pair's
    chosen and rejected always travel together (the DPO loss needs both). The split changes no number: the trainer
    divides each micro-batch's summed loss by the step's total pair count, so any split gives the same gradient.

    Raises ConfigError when one pair alone exceeds the budget (it could never be placed).
    """
    return pack_by_cost(pairs, [pair_tokens(p, shared_prompt) for p in pairs], token_budget, "pair")


def pack_by_cost(items: Sequence, costs: Sequence[int], token_budget: int, what: str = "example") -> list[list]:
    """First-fit decreasing of `items` (with their packed-token `costs`) into micro-batches of at most
    `token_budget` tokens (`pack_pairs`; SFT examples use it directly). Items keep their input order in each bin."""
    if token_budget <= 0:
        raise ConfigError(f"token_budget must be > 0 (got {token_budget})")
    too_long = [(c, item.row) for c, item in zip(costs, items) if c > token_budget]
    if too_long:
        cost, row = max(too_long)
        raise ConfigError(f"{what} at row {row} needs {cost} packed tokens, more than token_budget={token_budget}; "
                          f"raise token_budget to at least {cost} (the longest {what} must fit in one micro-batch) "
                          "or lower max_length")
    order = sorted(range(len(items)), key=lambda i: (-costs[i], i))  # stable: ties keep the input order
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for j, free in enumerate(room):
            if costs[i] <= free:
                bins[j].append(i)
                room[j] -= costs[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - costs[i])
    return [[items[i] for i in sorted(b)] for b in bins]


def padded_tokens(pairs: Sequence) -> int:
    """Non-padding tokens of `pairs` in the padded chosen-then-rejected layout (prompt counted twice): the token count
    that throughput figures use for every trainer alike, so packing's savings show as speed, not as fewer tokens."""
    return sum(pair_tokens(p, shared_prompt=False) for p in pairs)


# --------------------------------------------------------------------------------------------------------------------
# The attention function


class PackedLayout:
    """The attention layout of one packed batch, as the attention function needs it (built once per forward, shared
    by every layer)."""

    # A bucket of segments is padded to its longest; a segment joins the current bucket while the bucket's padded
    # attention area stays within this factor of its segments' own areas (sum of L^2).
    BUCKET_SLACK = 1.3

    def __init__(self, attn_index: torch.Tensor, attn_lengths: torch.Tensor, attn_out: torch.Tensor):
        self.segments, self.width = attn_index.shape
        self.index = attn_index
        self.lengths = attn_lengths
        self.out = attn_out  # [N]: padded slot (segment * width + position) whose output each packed token takes
        self._varlen = None
        self._buckets = None

    @classmethod
    def of_segments(cls, lengths: Sequence[int], device=None) -> "PackedLayout":
        """The layout of disjoint segments of these lengths (0 allowed), one after another in the packed row: what
        `collate_packed` makes without a shared prompt, for checking attention kernels on any segment lengths."""
        width = max(max(lengths, default=0), 1)
        index = torch.zeros(len(lengths), width, dtype=torch.long)
        out, start = [], 0
        for s, n in enumerate(lengths):
            index[s, :n] = torch.arange(start, start + n)
            out.extend(s * width + p for p in range(n))
            start += n
        return cls(index.to(device), torch.tensor(lengths, dtype=torch.long, device=device),
                   torch.tensor(out, dtype=torch.long, device=device))

    def varlen(self):
        """(token index [T], cumulative lengths [S+1] int32, output index [N]) of the concatenated segments, for
        Flash varlen: the same segments without the pad slots."""
        if self._varlen is None:
            valid = (torch.arange(self.width, device=self.lengths.device)[None] < self.lengths[:, None]).reshape(-1)
            index = self.index.reshape(-1)[valid]
            slot_to_varlen = valid.long().cumsum(0) - 1  # position of each (valid) padded slot in the concatenation
            cu = F.pad(self.lengths.cumsum(0), (1, 0)).to(torch.int32)
            self._varlen = (index, cu, slot_to_varlen[self.out])
        return self._varlen

    def buckets(self):
        """([(token index [n*w], n, w)], output index [N]) for the sdpa path: segments sorted by length and cut into
        buckets, each right-padded to its own longest segment (one padded block for all would waste attention
        FLOPs quadratically on the short ones); the output index points into the buckets' concatenated outputs."""
        if self._buckets is None:
            lengths = self.lengths.tolist()
            order = sorted(range(self.segments), key=lambda i: -lengths[i])
            groups, start = [], 0
            while start < len(order):
                w = lengths[order[start]]
                end, area = start + 1, w * w
                while end < len(order) and w * w * (end - start + 1) <= self.BUCKET_SLACK * (
                        area + lengths[order[end]] ** 2):
                    area += lengths[order[end]] ** 2
                    end += 1
                groups.append((order[start:end], max(w, 1)))
                start = end
            device = self.index.device
            slot_pos = torch.zeros(self.segments, self.width, dtype=torch.long, device=device)
            out, offset = [], 0
            for members, w in groups:
                rows = torch.tensor(members, dtype=torch.long, device=device)
                n = len(members)
                out.append((self.index.index_select(0, rows)[:, :w].reshape(-1), n, w))
                # slots beyond w are pad slots of shorter segments: never the output of a packed token
                slot_pos[rows, :w] = offset + torch.arange(n * w, device=device).view(n, w)
                offset += n * w
            self._buckets = (out, slot_pos.reshape(-1)[self.out])
        return self._buckets


def _sdpa_attention(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# The kernel: Flash varlen where this torch, device and model allow it, else the sdpa buckets
#
# `torch.nn.attention.varlen.varlen_attn` differs by torch release (read from each release's source):
#   2.4 - 2.9    no torch.nn.attention.varlen module.
#   2.10         varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
#                causal by `is_causal`; no `scale` (always 1/sqrt(head_dim)); no `window_size`; no `enable_gqa` (and
#                no head-count check: fewer K/V heads reach the kernel unchecked).
#   2.11         varlen_attn(..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1)): causal is
#                window_size=(-1, 0), compared as a tuple (a list would silently mean full attention); no `is_causal`,
#                no `enable_gqa`.
#   2.12 - 2.14  as 2.11, plus enable_gqa=False (fewer K/V heads without it is a ValueError), seqused_k,
#                block_table, num_splits.
# Every one returns the output [T, Hq, D] alone when return_aux is None, and none takes a dropout probability.
# dpokit reads the signature (not the version number) and passes only what it accepts; where it has no enable_gqa,
# the K/V heads are repeated to the query heads first (exact, as transformers' repeat_kv does for eager attention).

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256  # Flash's limit; head_dim must also be a multiple of 8


class FlashVarlen:
    """Causal attention over concatenated segments through one torch's `varlen_attn`, called the way its signature
    allows (`of`); `None` from `of` when it has no causal form dpokit knows."""

    def __init__(self, fn: Callable, causal: str, scale: bool, gqa: bool):
        self.fn, self.causal, self.scale, self.gqa = fn, causal, scale, gqa

    @classmethod
    def of(cls, fn: Callable) -> Optional["FlashVarlen"]:
        params = inspect.signature(fn).parameters
        causal = next((name for name in ("window_size", "is_causal") if name in params), None)
        return None if causal is None else cls(fn, causal, "scale" in params, "enable_gqa" in params)

    def refusal(self, head_dim: int, scaling: Optional[float]) -> Optional[str]:
        """Why this kernel cannot compute the model's attention (None: it can)."""
        if head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8:
            return f"head_dim {head_dim} (Flash needs a multiple of 8, at most {FLASH_MAX_HEAD_DIM})"
        if not self.scale and scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
            return (f"this torch's varlen_attn takes no scale and the model's attention scale {scaling:g} is not "
                    f"1/sqrt(head_dim)")
        return None

    def describe(self, groups: int) -> str:
        causal = "window_size=(-1, 0)" if self.causal == "window_size" else "is_causal=True"
        text = f"Flash varlen_attn ({causal}"
        if groups > 1:
            text += (", enable_gqa" if self.gqa
                     else f", K/V heads repeated {groups}x: this torch's varlen_attn has no enable_gqa")
        return text + ")"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scaling: Optional[float]) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], cu [S+1] int32 -> [T, Hq, D]."""
        groups = q.shape[1] // k.shape[1]
        kwargs: dict = {"window_size": (-1, 0)} if self.causal == "window_size" else {"is_causal": True}
        if self.scale:
            kwargs["scale"] = scaling
        if groups > 1 and self.gqa:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))  # query head h reads K/V head h // groups
        return self.fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def torch_varlen() -> tuple[str, Optional[Callable]]:
    """(torch's version, its `varlen_attn` or None where it has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return torch.__version__, None
    return torch.__version__, varlen_attn


def flash_device(query: torch.Tensor) -> tuple[bool, Optional[str]]:
    """(whether `query` is on a CUDA device, why its device and dtype cannot run Flash attention or None if they
    can)."""
    if not query.is_cuda:
        return False, f"{query.device.type} device"
    if query.dtype not in FLASH_DTYPES:
        return True, f"{str(query.dtype).removeprefix('torch.')} queries (Flash needs bf16 or fp16: set bf16 or fp16)"
    major, minor = torch.cuda.get_device_capability(query.device)
    if major < 8:
        return True, f"GPU compute capability {major}.{minor} (Flash needs 8.0 or newer)"
    return True, None


# "device-type dtype head_dim query-heads K/V-heads scale" -> the chosen kernel (None: the sdpa buckets)
KERNELS: dict = {}


def _choose_kernel(key: str, query: torch.Tensor, groups: int, scaling: Optional[float]) -> Optional[FlashVarlen]:
    (cuda, refusal), (version, fn), kernel = flash_device(query), torch_varlen(), None
    if refusal is None:
        kernel = FlashVarlen.of(fn) if fn is not None else None
        refusal = (f"torch {version} has no torch.nn.attention.varlen (it came with torch 2.10)" if fn is None
                   else "its varlen_attn takes neither window_size nor is_causal" if kernel is None
                   else kernel.refusal(query.shape[-1], scaling))
    if refusal is not None:
        kernel = None
    KERNELS[key] = kernel
    if cuda:  # off CUDA the sdpa buckets are the only kernel: nothing to announce
        chosen = kernel.describe(groups) if kernel else f"sdpa buckets, not Flash varlen: {refusal}"
        log(f"packed attention, torch {version}, {query.device.type} {str(query.dtype).removeprefix('torch.')}: "
            f"{chosen}")
    return kernel


def packed_kernel(query: torch.Tensor, key: torch.Tensor, scaling: Optional[float]) -> Optional[FlashVarlen]:
    """The kernel for packed attention on these inputs: a FlashVarlen, or None for the sdpa buckets. Chosen once per
    device, dtype, head shape and scale by what the installed torch and the device support, and announced then (on
    CUDA) in one line naming the torch version and the kernel, so a fall back to the buckets never goes unseen."""
    groups = query.shape[1] // key.shape[1]
    # A string key: compiled layers guard on it (torch.compile does not re-check a key holding a torch.dtype).
    cache_key = f"{query.device.type} {query.dtype} {query.shape[-1]} {query.shape[1]} {key.shape[1]} {scaling!r}"
    if cache_key in KERNELS:
        return KERNELS[cache_key]
    # Outside any graph: inside compiled decoder layers the choice (a signature read, a print) still runs once.
    return torch.compiler.disable(_choose_kernel)(cache_key, query, groups, scaling)


def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """Transformers attention function (query [1, Hq, N, D], key/value [1, Hkv, N, D] -> ([1, N, Hq, D], None)).

    With a `PackedLayout` in kwargs: causal attention inside each segment. Without: plain sdpa (padded batches)."""
    layout: Optional[PackedLayout] = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return _sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got query batch size {query.shape[0]}")
    if kwargs.get("softcap") is not None:
        raise ConfigError("packing does not support attention logit soft-capping (Gemma-2 style); "
                          "turn packing off for this model")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and layout.width > window:
        raise ConfigError(f"packing does not implement sliding-window attention and a sequence here is longer "
                          f"({layout.width} tokens) than the window ({window}); turn packing off for this model")
    groups = query.shape[1] // key.shape[1]
    dropout = dropout if module.training else 0.0
    flash = packed_kernel(query, key, scaling)
    if flash is not None:
        if dropout:
            raise ConfigError("attention dropout is not supported by the packed Flash path; set disable_dropout")
        index, cu, out_index = layout.varlen()
        q, k, v = (t[0].transpose(0, 1).index_select(0, index) for t in (query, key, value))  # [T, H, D]
        return flash(q, k, v, cu, layout.width, scaling).index_select(0, out_index)[None], None
    buckets, out_index = layout.buckets()
    outputs = []
    for index, n, w in buckets:
        def gather(t: torch.Tensor) -> torch.Tensor:  # [1, H, N, D] -> [n, H, w, D]
            heads, dim = t.shape[1], t.shape[3]
            return t[0].index_select(1, index).view(heads, n, w, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), dropout_p=dropout,
                                             is_causal=True, scale=scaling, enable_gqa=groups > 1)  # [n, Hq, w, D]
        outputs.append(out.transpose(1, 2).reshape(n * w, out.shape[1], out.shape[3]))
    return torch.cat(outputs).index_select(0, out_index)[None], None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    # Padded batches get sdpa's masks; packed ones pass an all-ones 2-D mask, for which sdpa_mask returns None
    # (no [N, N] mask is ever built).
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable_packed_attention(model: nn.Module) -> nn.Module:
    """Switch `model` (or the model inside a peft/DDP wrapper) to the `dpokit_packed` attention function. Idempotent.
    Padded batches still get plain sdpa afterwards, so this is safe to call on any model that supports sdpa."""
    base = base_model(model)
    if getattr(base.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return model
    if not getattr(base, "_supports_sdpa", False):
        raise ConfigError(f"{type(base).__name__} does not support sdpa attention, so dpokit cannot pack its batches;"
                          " turn packing off")
    _register()
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
    if base.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ConfigError(f"{type(base).__name__} does not let dpokit set its attention function "
                          "(it does not use transformers' AttentionInterface); turn packing off")
    return model


# --------------------------------------------------------------------------------------------------------------------
# Log-probs


def is_packed(batch: dict) -> bool:
    return "attn_index" in batch


def packed_completion_logps(model: nn.Module, batch: dict, *, chunk_size: int = 1024,
                            with_weights: bool = False) -> CompletionLogps:
    """`completion_logps` for a `collate_packed` batch: one decoder pass over the packed row, the LM head on the
    scored positions only (chunked, as in dpokit.logps).

    Returns sequences in the padded path's order (chosen of every pair, then rejected). `token_logps`/`mask` are
    [2B, C] with C the longest completion: column k is completion token k (the padded path indexes by sequence
    position instead; sums, lengths and LD-DPO's completion-token counting are the same either way)."""
    enable_packed_attention(model)
    decoder, head, scale, softcap = causal_lm_parts(model)
    layout = PackedLayout(batch["attn_index"], batch["attn_lengths"], batch["attn_out"])
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False,
                     **{LAYOUT_KWARG: layout}).last_hidden_state[0]  # [N, H]
    picked = hidden.index_select(0, batch["score_index"])
    result = target_logps(picked, head, batch["score_target"], chunk_size=chunk_size, scale=scale, softcap=softcap,
                          with_sq=with_weights)
    token_lp, sq = result if with_weights else (result, None)
    lengths = batch["completion_lengths"]
    n_seq = lengths.shape[0]
    width = int(batch["score_col"].max()) + 1 if batch["score_col"].numel() else 1
    flat = batch["score_seq"] * width + batch["score_col"]
    token_logps = torch.zeros(n_seq * width, dtype=torch.float32, device=hidden.device).index_put(
        (flat,), token_lp).view(n_seq, width)
    mask = torch.zeros(n_seq * width, dtype=torch.bool, device=hidden.device).index_fill(0, flat, True)
    weight_logps = None
    if with_weights:
        weight_logps = torch.zeros(n_seq, dtype=torch.float32, device=hidden.device).index_add(
            0, batch["score_seq"], token_lp.detach() - sq)
    return CompletionLogps(logps=token_logps.sum(-1), lengths=lengths, token_logps=token_logps,
                           mask=mask.view(n_seq, width), weight_logps=weight_logps)


def batch_logps(model: nn.Module, batch: dict, *, chunk_size: int = 1024, with_weights: bool = False) -> CompletionLogps:
    """Completion log-probs of a padded (`collate_pairs`) or packed (`collate_packed`) batch: one call for both."""
    if is_packed(batch):
        return packed_completion_logps(model, batch, chunk_size=chunk_size, with_weights=with_weights)
    return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                            chunk_size=chunk_size, with_weights=with_weights)
