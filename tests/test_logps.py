"""The chunked LM-head log-probs equal the plain full-logits computation, values and gradients."""

import torch
import torch.nn.functional as F

from dpokit.logps import completion_logps, target_logps
from conftest import tiny_llama


def plain_logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (lp * completion_mask[:, 1:]).sum(-1)


def batch(vocab=128, n=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[1, 9:] = 0  # right padding on one row
    comp = torch.zeros(n, t, dtype=torch.long)
    comp[:, 5:] = 1
    comp = comp * attn
    return ids, attn, comp


def test_chunked_equals_plain_values_and_grads():
    model = tiny_llama()
    ids, attn, comp = batch()
    ref = plain_logps(model, ids, attn, comp)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = completion_logps(model, ids, attn, comp, chunk_size=4)  # several chunks, a ragged last one
    torch.testing.assert_close(out.logps, ref, rtol=1e-5, atol=1e-5)
    assert out.lengths.tolist() == [7, 4, 7]
    out.logps.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_target_logps_with_bias_scale_softcap_matches_autograd():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=True).double()
    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (7,))
    for scale, cap in [(1.0, None), (0.5, None), (1.0, 3.0), (2.0, 5.0)]:
        z = F.linear(h, head.weight, head.bias) * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        want = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
        gw = torch.randn(7, dtype=torch.float64)
        want_grads = torch.autograd.grad((want * gw).sum(), (h, head.weight, head.bias))
        got, sq = target_logps(h, head, y, chunk_size=3, scale=scale, softcap=cap, with_sq=True)
        got_grads = torch.autograd.grad((got * gw).sum(), (h, head.weight, head.bias))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
        p = torch.softmax(z, -1)
        torch.testing.assert_close(sq.double(), torch.log((p ** 2).sum(-1)).detach(), rtol=1e-5, atol=1e-6)
