"""Batches of tokenized examples as padded tensors.

Preference pairs are laid out chosen-first: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, so one
forward serves both (the DPO repo's `concatenated_forward`). Right padding; `completion_mask` marks the tokens the
loss sees (completion tokens only, never the prompt, never padding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pad_sequences(seqs: Sequence[np.ndarray], masks: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id arrays to the longest; returns input_ids, attention_mask and completion_mask [N, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        attn[i, : len(s)] = 1
        comp[i, : len(s)] = torch.as_tensor(np.asarray(m, dtype=np.int64))
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def _joined(prompt: np.ndarray, completion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seq = np.concatenate([prompt, completion])
    mask = np.concatenate([np.zeros(len(prompt), np.int64), np.ones(len(completion), np.int64)])
    return seq, mask


def collate_pairs(pairs: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """TokenizedPair list -> chosen-then-rejected padded batch [2B, T], plus `row` [B] (dataset row ids)."""
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            s, m = _joined(p.prompt_ids, getattr(p, side))
            seqs.append(s)
            masks.append(m)
    out = pad_sequences(seqs, masks, pad_id)
    out["row"] = torch.tensor([p.row for p in pairs], dtype=torch.long)
    return out


def collate_sft(examples: Sequence, pad_id: int, completion_only_loss: bool = True) -> dict[str, torch.Tensor]:
    """TokenizedSFT list -> padded batch [B, T]; with `completion_only_loss=False` every token but the first counts."""
    seqs, masks = [], []
    for ex in examples:
        s, m = _joined(ex.prompt_ids, ex.completion_ids)
        if not completion_only_loss:
            m = np.ones_like(m)
        seqs.append(s)
        masks.append(m)
    out = pad_sequences(seqs, masks, pad_id)
    out["row"] = torch.tensor([ex.row for ex in examples], dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Padding-free layout (see dpokit.packing for the model side)


def pair_tokens(pair, shared_prompt: bool = False) -> int:
    """Tokens one pair occupies in a packed batch: prompt twice (once with each completion), or once when shared."""
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    return p + c + r if shared_prompt else 2 * p + c + r


def collate_packed(pairs: Sequence, shared_prompt: bool = False) -> dict[str, torch.Tensor]:
    """TokenizedPair list -> one padding-free row holding every pair's chosen and rejected sequence.

    Without `shared_prompt` each pair contributes two sequences, prompt‖chosen and prompt‖rejected, positions
    restarting at 0 for each. With it, one sequence prompt‖chosen‖rejected: the prompt is stored (and run through the
    model) once, and rejected's positions restart at len(prompt), so it sees exactly what it would see alone.

    Returned tensors (N packed tokens, B pairs, S = 2B attention segments, M scored tokens):

    - input_ids, position_ids, attention_mask [1, N]: the packed row (the mask is all ones; it only tells
      transformers that there is no padding, so it builds no [N, N] mask).
    - attn_index [S, L]: the packed token index of each slot of each attention segment, right-padded with index 0.
      Segment i is "the sequence as the model would see it alone": prompt‖chosen of pair i for i < B, prompt‖rejected
      of pair i-B otherwise (with a shared prompt, the latter reuses the prompt's packed tokens). Causal attention
      inside each segment is exactly the padded path's attention.
    - attn_lengths [S]: valid slots per segment.
    - attn_out [N]: for each packed token, the flat slot (segment * L + position) whose attention output it takes.
      With a shared prompt a prompt token sits in two segments; its output comes from the chosen one (both are equal:
      the prompt never sees a completion).
    - score_index, score_target, score_seq, score_col [M]: for each scored completion token, the packed index of the
      hidden state that predicts it, its id, its sequence (chosen rows 0..B-1, then rejected B..2B-1, as in
      `collate_pairs`) and its 0-based index within that completion.
    - completion_lengths [2B]: scored tokens per sequence (= `completion_logps(...).lengths`); row [B] (dataset row ids); logical_tokens: the token count of the equivalent padded
      batch without padding (what a padded trainer would compute), for throughput figures.
    """
    if not pairs:
        raise ValueError("collate_packed: no pairs")
    b = len(pairs)
    ids, pos = [], []
    segments: list[np.ndarray] = [None] * (2 * b)  # packed indices per segment
    score_index, score_target, score_seq, score_col = [], [], [], []
    offset = 0

    def add_scores(seq: int, hidden_at: np.ndarray, targets: np.ndarray) -> None:
        # A completion token at sequence position 0 has no prefix and is never scored (as in the padded path).
        keep = hidden_at >= 0
        score_index.append(hidden_at[keep])
        score_target.append(targets[keep])
        score_seq.append(np.full(int(keep.sum()), seq, np.int64))
        score_col.append(np.arange(len(targets), dtype=np.int64)[keep])

    for i, pair in enumerate(pairs):
        prompt = np.asarray(pair.prompt_ids, np.int64)
        chosen = np.asarray(pair.chosen_ids, np.int64)
        rejected = np.asarray(pair.rejected_ids, np.int64)
        p, c, r = len(prompt), len(chosen), len(rejected)
        if shared_prompt:
            ids += [prompt, chosen, rejected]
            pos += [np.arange(p + c), np.arange(p, p + r)]
            prompt_idx = offset + np.arange(p)
            chosen_idx = offset + p + np.arange(c)
            rejected_idx = offset + p + c + np.arange(r)
            offset += p + c + r
        else:
            ids += [prompt, chosen, prompt, rejected]
            pos += [np.arange(p + c), np.arange(p + r)]
            prompt_idx = offset + np.arange(p)
            chosen_idx = offset + p + np.arange(c)
            rejected_prompt_idx = offset + p + c + np.arange(p)
            rejected_idx = offset + 2 * p + c + np.arange(r)
            offset += 2 * p + c + r
        chosen_seg = np.concatenate([prompt_idx, chosen_idx])
        rejected_seg = np.concatenate([prompt_idx if shared_prompt else rejected_prompt_idx, rejected_idx])
        segments[i], segments[b + i] = chosen_seg, rejected_seg
        # Token k of a completion is predicted by the segment slot before it (the last prompt token for k = 0).
        add_scores(i, chosen_seg[p - 1 + np.arange(c)] if p else np.r_[-1, chosen_seg[: c - 1]], chosen)
        add_scores(b + i, rejected_seg[p - 1 + np.arange(r)] if p else np.r_[-1, rejected_seg[: r - 1]], rejected)

    return _packed_batch(ids, pos, segments, (score_index, score_target, score_seq, score_col), 2 * b,
                         [p.row for p in pairs], sum(pair_tokens(p) for p in pairs))


def _packed_batch(ids: list, pos: list, segments: list, scores: tuple, n_seqs: int, rows: list,
                  logical_tokens: int) -> dict[str, torch.Tensor]:
    """The tensors of a packed batch (`collate_packed`'s docstring) from its pieces: token ids and positions in
    packed order, each attention segment's packed indices, and the scored tokens' (index, target, sequence,
    column) arrays. A token in several segments (a shared prompt) takes its output from the first of them."""
    n = sum(len(x) for x in ids)
    width = max(len(s) for s in segments)
    attn_index = torch.zeros((len(segments), width), dtype=torch.long)
    for s, seg in enumerate(segments):
        attn_index[s, : len(seg)] = torch.from_numpy(seg)
    # Later segments first, earlier ones last: a shared prompt token ends up owned by its chosen segment.
    attn_out = np.full(n, -1, np.int64)
    for s in reversed(range(len(segments))):
        attn_out[segments[s]] = s * width + np.arange(len(segments[s]))
    if (attn_out < 0).any():  # cannot happen: every token is in its own sequence's segment
        raise RuntimeError("packed batch: a packed token belongs to no attention segment")
    input_ids = torch.from_numpy(np.concatenate(ids))[None]
    score_index, score_target, score_seq, score_col = (torch.from_numpy(np.concatenate(x)) for x in scores)
    return {
        "input_ids": input_ids,
        "position_ids": torch.from_numpy(np.concatenate(pos))[None],
        "attention_mask": torch.ones_like(input_ids),
        "attn_index": attn_index,
        "attn_lengths": torch.tensor([len(s) for s in segments], dtype=torch.long),
        "attn_out": torch.from_numpy(attn_out),
        "score_index": score_index,
        "score_target": score_target,
        "score_seq": score_seq,
        "score_col": score_col,
        "completion_lengths": torch.bincount(score_seq, minlength=n_seqs),
        "row": torch.tensor(rows, dtype=torch.long),
        "logical_tokens": torch.tensor(logical_tokens),
    }


def collate_packed_sft(examples: Sequence, completion_only_loss: bool = True) -> dict[str, torch.Tensor]:
    """TokenizedSFT list -> one padding-free row holding every example's prompt‖completion, positions restarting at 0
    for each, in the layout of `collate_packed` (one attention segment per example; score_* index the tokens the
    loss covers: the completion's, or with `completion_only_loss=False` every token but the first, as `collate_sft`
    masks them). `completion_lengths` [B] counts them per example."""
    if not examples:
        raise ValueError("collate_packed_sft: no examples")
    ids, pos, segments = [], [], []
    score_index, score_target, score_seq, score_col = [], [], [], []
    offset = 0
    for i, ex in enumerate(examples):
        seq = np.concatenate([np.asarray(ex.prompt_ids, np.int64), np.asarray(ex.completion_ids, np.int64)])
        n, first = len(seq), len(ex.prompt_ids) if completion_only_loss else 0
        ids.append(seq)
        pos.append(np.arange(n))
        segments.append(offset + np.arange(n))
        # Token j is predicted by the hidden state at j - 1; token 0 has no prefix and is never scored.
        scored = np.arange(max(first, 1), n)
        score_index.append(offset + scored - 1)
        score_target.append(seq[scored])
        score_seq.append(np.full(len(scored), i, np.int64))
        score_col.append(scored - max(first, 1))
        offset += n
    return _packed_batch(ids, pos, segments, (score_index, score_target, score_seq, score_col), len(examples),
                         [ex.row for ex in examples], offset)
