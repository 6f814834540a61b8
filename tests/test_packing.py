"""Padding-free packing (dpokit.packing): every fast path gives the plain padded path's numbers.

The reference ("plain") computation is the most literal one: a padded chosen-then-rejected batch, full
[batch, seq, vocab] logits from the model's own forward, log_softmax, gather. Each fast path — packed, packed with a
shared prompt, the chunked LM head, precomputed reference log-probs — alone and combined, must give the same
per-sequence log-probs, DPO loss and parameter gradients.

Tolerances (float32): log-probs and losses rtol=1e-5, atol=1e-5; gradients rtol=1e-4, atol=1e-6. The paths run the
same operations on differently shaped tensors (packed rows, padded attention buckets, chunks), so only float
reassociation separates them. Under bf16 autocast: rtol=2e-2 (bf16 has 8 mantissa bits).
"""

import copy
import itertools

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from dpokit import losses
from dpokit.data.collate import collate_pairs, collate_packed, pair_tokens
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import ConfigError
from dpokit.logps import completion_logps
from dpokit.packing import (ATTN_IMPLEMENTATION, batch_logps, enable_packed_attention, pack_pairs,
                            packed_completion_logps, padded_tokens)
from dpokit.reference import ModelReference, no_autocast, precompute

LOGP_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def make_pairs(n=6, vocab=128, seed=0, empty_prompt=False):
    """Pairs of varied lengths: prompts 1-12 tokens (one empty if asked), completions 1-9 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = 0 if (empty_prompt and i == 1) else int(rng.integers(1, 13))
        ids = [rng.integers(3, vocab, k).astype(np.int32) for k in (p, rng.integers(1, 10), rng.integers(1, 10))]
        out.append(TokenizedPair(ids[0], ids[1], ids[2], row=10 + i))
    return out


def tiny_qwen2(vocab=128, seed=0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, use_sliding_window=False)
    cfg.update(overrides)
    return Qwen2ForCausalLM(Qwen2Config(**cfg))


def plain_logps(model, batch):
    """Per-sequence summed completion log-probs from full logits: the most literal computation."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (lp * batch["completion_mask"][:, 1:]).sum(-1)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **GRAD_TOL, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("shared", [False, True])
def test_collate_packed_layout(shared):
    pairs = make_pairs(4)
    b = collate_packed(pairs, shared_prompt=shared)
    n = b["input_ids"].shape[1]
    assert n == sum(pair_tokens(p, shared) for p in pairs)
    assert int(b["logical_tokens"]) == padded_tokens(pairs) == int(collate_pairs(pairs, 0)["attention_mask"].sum())
    # Every segment, read through attn_index, is exactly the padded path's sequence, with positions 0..L-1.
    padded = collate_pairs(pairs, 0)
    for s in range(2 * len(pairs)):
        length = int(b["attn_lengths"][s])
        idx = b["attn_index"][s, :length]
        assert b["input_ids"][0, idx].tolist() == padded["input_ids"][s, :length].tolist()
        assert b["position_ids"][0, idx].tolist() == list(range(length))
    # Each packed token takes its output from a slot that holds that very token.
    width = b["attn_index"].shape[1]
    assert torch.equal(b["attn_index"].reshape(-1)[b["attn_out"]], torch.arange(n))
    assert b["attn_out"].max() < 2 * len(pairs) * width
    assert b["completion_lengths"].tolist() == padded["completion_mask"][:, 1:].sum(-1).tolist()
    assert b["row"].tolist() == [p.row for p in pairs]


def test_shared_prompt_positions_restart_after_prompt():
    pair = TokenizedPair(np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32), np.array([10, 11, 12], np.int32), 0)
    b = collate_packed([pair], shared_prompt=True)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    # The first rejected token is predicted from the last prompt token, not from the last chosen one.
    assert b["score_index"].tolist() == [2, 3, 2, 5, 6]
    assert b["score_seq"].tolist() == [0, 0, 1, 1, 1]


# --------------------------------------------------------------------------------------------------------------------
# Log-probs and gradients of the policy


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama-gqa", "qwen2-bias-tied"])
@pytest.mark.parametrize("shared", [False, True], ids=["packed", "packed+shared"])
def test_packed_logps_and_grads_equal_plain(make_model, shared):
    model = make_model()
    pairs = make_pairs(6, empty_prompt=True)
    padded = collate_pairs(pairs, 0)
    want = plain_logps(model, padded)
    want.sum().backward()
    want_grads = grads(model)
    model.zero_grad()
    out = packed_completion_logps(model, collate_packed(pairs, shared_prompt=shared), chunk_size=5)
    torch.testing.assert_close(out.logps, want, **LOGP_TOL)
    assert out.lengths.tolist() == padded["completion_mask"][:, 1:].sum(-1).tolist()
    out.logps.sum().backward()
    assert_grads_close(grads(model), want_grads)


def test_padded_batches_unchanged_after_enabling_packed_attention():
    model = tiny_llama()
    batch = collate_pairs(make_pairs(5), 0)
    before = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    enable_packed_attention(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    after = batch_logps(model, batch)  # the padded branch of the dispatcher
    torch.testing.assert_close(after.logps, before, rtol=0, atol=0)


def test_packed_per_token_logps_ld_and_wpo_weights_equal_padded():
    model = tiny_llama()
    pairs = make_pairs(5)
    padded = collate_pairs(pairs, 0)
    want = completion_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"],
                            with_weights=True)
    got = packed_completion_logps(model, collate_packed(pairs, shared_prompt=True), with_weights=True)
    # Same tokens in the same order per sequence (the padded path indexes by position, the packed one by token).
    for i in range(2 * len(pairs)):
        torch.testing.assert_close(got.token_logps[i][got.mask[i]], want.token_logps[i][want.mask[i]], **LOGP_TOL)
    torch.testing.assert_close(got.weight_logps, want.weight_logps, **LOGP_TOL)
    b = len(pairs)
    assert torch.equal(got.lengths, want.lengths)
    public = torch.minimum(want.lengths[:b], want.lengths[b:]).repeat(2)
    torch.testing.assert_close(losses.ld_aggregate(got.token_logps, got.mask, public, 0.3),
                               losses.ld_aggregate(want.token_logps, want.mask, public, 0.3), **LOGP_TOL)


# --------------------------------------------------------------------------------------------------------------------
# The whole DPO loss: every mode alone and combined


def dpo_loss_and_grads(policy, reference, pairs, *, layout, chunk_size, precomputed):
    """DPO (sigmoid) loss of `pairs` and the policy gradients, computed the way `layout`/`chunk_size`/`precomputed`
    say; layout "plain" is the literal full-logits computation for policy and reference alike."""
    policy.zero_grad()
    b = len(pairs)
    if layout == "plain":
        batch = collate_pairs(pairs, 0)
        with torch.no_grad():
            ref = plain_logps(reference, batch)
        pol = plain_logps(policy, batch)
    else:
        batch = collate_packed(pairs, shared_prompt=layout == "packed+shared") if layout != "padded" \
            else collate_pairs(pairs, 0)
        if precomputed:
            # Precomputed over padded batches of another size, in another order, looked up by row.
            ref_model = ModelReference(copy.deepcopy(reference), lambda out: out.logps, chunk_size, no_autocast)
            loader = [collate_pairs(list(reversed(pairs[:3])), 0), collate_pairs(pairs[3:], 0)]
            table = precompute(ref_model, loader, num_rows=max(p.row for p in pairs) + 1)
            ref = table.logps(batch)
        else:
            with torch.no_grad():
                ref = batch_logps(reference, batch, chunk_size=chunk_size).logps
        pol = batch_logps(policy, batch, chunk_size=chunk_size).logps
    result = losses.preference_loss("sigmoid", pol[:b], pol[b:], ref[:b], ref[b:], beta=0.5)
    loss = result.losses.mean()
    loss.backward()
    return loss.detach(), pol.detach(), grads(policy)


MODES = list(itertools.product(["padded", "packed", "packed+shared"], [3, 4096], [False, True]))


@pytest.mark.parametrize("layout,chunk_size,precomputed", MODES,
                         ids=[f"{l}-chunk{c}-{'precomputed' if p else 'live'}-ref" for l, c, p in MODES])
def test_dpo_loss_and_grads_equal_plain(layout, chunk_size, precomputed):
    policy = tiny_llama(seed=0)
    reference = tiny_llama(seed=1)  # a different model, so the loss is not trivially log 2
    for p in reference.parameters():
        p.requires_grad_(False)
    pairs = make_pairs(7, seed=3)
    want_loss, want_logps, want_grads = dpo_loss_and_grads(policy, reference, pairs, layout="plain",
                                                           chunk_size=None, precomputed=False)
    assert abs(float(want_loss) - float(np.log(2))) > 1e-3
    got_loss, got_logps, got_grads = dpo_loss_and_grads(policy, reference, pairs, layout=layout,
                                                        chunk_size=chunk_size, precomputed=precomputed)
    torch.testing.assert_close(got_logps, want_logps, **LOGP_TOL)
    torch.testing.assert_close(got_loss, want_loss, **LOGP_TOL)
    assert_grads_close(got_grads, want_grads)


def test_packed_micro_batches_give_the_one_batch_gradient():
    """pack_pairs' split of a step into micro-batches (loss sum / step pairs each) equals the step as one batch."""
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    pairs = make_pairs(8, seed=4)
    _, _, want = dpo_loss_and_grads(policy, reference, pairs, layout="plain", chunk_size=None, precomputed=False)
    policy.zero_grad()
    micro = pack_pairs(pairs, token_budget=60, shared_prompt=True)
    assert len(micro) > 2
    for mb in micro:
        batch = collate_packed(mb, shared_prompt=True)
        b = len(mb)
        with torch.no_grad():
            ref = packed_completion_logps(reference, batch).logps
        pol = packed_completion_logps(policy, batch).logps
        loss = losses.preference_loss("sigmoid", pol[:b], pol[b:], ref[:b], ref[b:], beta=0.5).losses
        (loss.sum() / len(pairs)).backward()
    assert_grads_close(grads(policy), want)


# --------------------------------------------------------------------------------------------------------------------
# With the trainer's other switches


def test_packed_with_gradient_checkpointing_equals_plain():
    """Checkpointed layers recompute attention in backward: the layout must reach the recomputation too."""
    model = tiny_llama()
    pairs = make_pairs(5)
    want = plain_logps(model, collate_pairs(pairs, 0))
    want.sum().backward()
    want_grads = grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = packed_completion_logps(model, collate_packed(pairs, shared_prompt=True))
    out.logps.sum().backward()
    torch.testing.assert_close(out.logps, want, **LOGP_TOL)
    assert_grads_close(grads(model), want_grads)


def test_packed_through_lora_equals_padded():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    pairs = make_pairs(4)
    padded = collate_pairs(pairs, 0)
    want = completion_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"])
    want.logps.sum().backward()
    want_grads = grads(model)
    model.zero_grad()
    got = batch_logps(model, collate_packed(pairs, shared_prompt=True))
    got.logps.sum().backward()
    torch.testing.assert_close(got.logps, want.logps, **LOGP_TOL)
    assert_grads_close(grads(model), want_grads)
    with model.disable_adapter():  # the adapter-off reference, packed
        off = batch_logps(model, collate_packed(pairs, shared_prompt=True)).logps
        off_padded = completion_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"])
    torch.testing.assert_close(off, off_padded.logps, **LOGP_TOL)


def test_packed_under_bf16_autocast_close_to_padded():
    model = tiny_llama()
    pairs = make_pairs(5)
    padded = collate_pairs(pairs, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = completion_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"]).logps
        got = packed_completion_logps(model, collate_packed(pairs, shared_prompt=True)).logps
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_sliding_window_longer_than_window_is_refused():
    model = tiny_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ConfigError, match="sliding-window"):
        packed_completion_logps(model, collate_packed(make_pairs(3), shared_prompt=True))


# --------------------------------------------------------------------------------------------------------------------
# Length-aware micro-batches


def test_pack_pairs_respects_budget_and_keeps_every_pair_once():
    pairs = make_pairs(40, seed=5)
    for shared in (False, True):
        micro = pack_pairs(pairs, token_budget=64, shared_prompt=shared)
        rows = sorted(p.row for mb in micro for p in mb)
        assert rows == sorted(p.row for p in pairs)
        assert all(sum(pair_tokens(p, shared) for p in mb) <= 64 for mb in micro)
        # First-fit decreasing fills budgets: at most one micro-batch more than the ideal count.
        total = sum(pair_tokens(p, shared) for p in pairs)
        assert len(micro) <= -(-total // 64) + 1
        # Within a micro-batch the pairs keep their input order (the split is deterministic).
        index = {p.row: i for i, p in enumerate(pairs)}
        assert all([index[p.row] for p in mb] == sorted(index[p.row] for p in mb) for mb in micro)


def test_pack_pairs_refuses_a_pair_longer_than_the_budget():
    pairs = make_pairs(3)
    longest = max(pair_tokens(p) for p in pairs)
    with pytest.raises(ConfigError, match=f"at least {longest}"):
        pack_pairs(pairs, token_budget=longest - 1)
    with pytest.raises(ConfigError, match="token_budget must be > 0"):
        pack_pairs(pairs, token_budget=0)


# --------------------------------------------------------------------------------------------------------------------
# SFT: the same layout for single sequences


@pytest.mark.parametrize("completion_only", [True, False], ids=["completion_only", "every_token"])
def test_packed_sft_logps_and_grads_equal_plain(completion_only):
    """`collate_packed_sft` scores exactly the tokens `collate_sft` masks in, with the same log-probs and gradients
    (text rows with no prompt included)."""
    from dpokit.data.collate import collate_packed_sft, collate_sft
    from dpokit.data.tokenize import TokenizedSFT

    model = tiny_llama()
    rng = np.random.default_rng(3)
    examples = [TokenizedSFT(rng.integers(3, 128, p).astype(np.int32), rng.integers(3, 128, c).astype(np.int32), i)
                for i, (p, c) in enumerate([(5, 3), (0, 7), (1, 1), (9, 4)])]
    padded = collate_sft(examples, 0, completion_only)
    want = plain_logps(model, padded)
    want.sum().backward()
    want_grads = grads(model)
    model.zero_grad()
    packed = collate_packed_sft(examples, completion_only)
    assert packed["input_ids"].shape[1] == sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    out = packed_completion_logps(model, packed, chunk_size=4)
    torch.testing.assert_close(out.logps, want, **LOGP_TOL)
    assert out.lengths.tolist() == padded["completion_mask"][:, 1:].sum(-1).tolist()
    out.logps.sum().backward()
    assert_grads_close(grads(model), want_grads)
