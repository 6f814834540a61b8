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
