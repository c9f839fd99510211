"""Tree rollouts: the tree advantage on a hand-built tree, and shared prefixes trained once giving exactly the loss
and gradient of every path expanded into its own row (each reduction, with KL and entropy terms); then a GRPO stage
on trees end to end."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from forkrl.algos.loss import grpo_loss
from forkrl.algos.tree import path_weights, tree_advantages, tree_coefficients, tree_loss
from forkrl.config import parse_config
from forkrl.forward import ModelForward
from forkrl.pipeline import run
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict


def test_tree_advantage_hand_case():
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    tree = torch.tensor([0, 0, 0, 1, 1, 1])
    prompt = torch.zeros(6, dtype=torch.long)
    adv = tree_advantages(reward, tree, prompt, torch.ones(6, dtype=torch.bool), eps=1e-4)
    within = [2 / 3 / (1 / 3) ** 0.5, -1 / 3 / (1 / 3) ** 0.5, -1 / 3 / (1 / 3) ** 0.5, 0, 0, 0]
    across = [(1 / 3) / (4 / 15) ** 0.5, (-2 / 3) / (4 / 15) ** 0.5, (-2 / 3) / (4 / 15) ** 0.5] + \
        [(1 / 3) / (4 / 15) ** 0.5] * 3
    assert adv.tolist() == pytest.approx([w + a for w, a in zip(within, across)], rel=1e-3)  # ε = 1e-4 in σ + ε
    assert adv.tolist() == pytest.approx([1.8002, -1.8683, -1.8683, 0.6455, 0.6455, 0.6455], abs=1e-3)


def rows_of(seqs: list[tuple[list[int], list[int]]]) -> Rollouts:
    """Right-padded rows of (context, own tokens): the context PROMPT, the own tokens COMPLETION."""
    n, width = len(seqs), max(len(c) + len(o) for c, o in seqs)
    ids = torch.zeros(n, width, dtype=torch.long)
    role = torch.full((n, width), int(Role.PAD), dtype=torch.int8)
    for r, (c, o) in enumerate(seqs):
        ids[r, : len(c) + len(o)] = torch.tensor(c + o)
        role[r, : len(c)] = int(Role.PROMPT)
        role[r, len(c) : len(c) + len(o)] = int(Role.COMPLETION)
    z = torch.zeros(n, dtype=torch.long)
    return Rollouts(ids, role, torch.zeros(n, width), z, z, z.bool())


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                       "seq_mean_token_sum_norm"])
def test_shared_prefixes_trained_once_equal_every_path_expanded(tiny_model_dir, reduction):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    g = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(5, 200, (n,), generator=g).tolist()  # noqa: E731
    pa, pb = tok(4), tok(3)
    c1, s1, s2, c2, s3, c3 = tok(6), tok(3), tok(5), tok(3), tok(4), tok(5)
    # compact rows: chains whole; each continuation's row holds the chain's shared prefix as context
    compact = rows_of([(pa, c1), (pa + c1[:2], s1), (pa + c1[:4], s2), (pa, c2), (pa + c2[:1], s3), (pb, c3)])
    la, lb = len(pa), len(pb)
    spans = [[(0, la - 1, la - 1 + 6)],
             [(0, la - 1, la - 1 + 2), (1, la + 2 - 1, la + 2 - 1 + 3)],
             [(0, la - 1, la - 1 + 4), (2, la + 4 - 1, la + 4 - 1 + 5)],
             [(3, la - 1, la - 1 + 3)],
             [(3, la - 1, la - 1 + 1), (4, la + 1 - 1, la + 1 - 1 + 4)],
             [(5, lb - 1, lb - 1 + 5)]]
    paths = [(pa, c1), (pa, c1[:2] + s1), (pa, c1[:4] + s2), (pa, c2), (pa, c2[:1] + s3), (pb, c3)]
    expanded = rows_of(paths)
    len_L = torch.tensor([len(o) for _, o in paths])
    adv_L = torch.tensor([1.3, -0.4, 0.8, -1.1, 0.2, 0.5], dtype=torch.float64)
    totals = dict(total_tokens=int(len_L.sum()), total_paths=len(paths))
    terms = dict(kl_coef=0.1, entropy_coef=0.05, kl_estimator="k3")

    def grad_of(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    fwd, rfwd = ModelForward(model), ModelForward(ref)
    logp, H, mask = fwd.logprobs(expanded, entropy="grad")
    with torch.no_grad():
        ref_logp, _, _ = rfwd.logprobs(expanded)
    want = grpo_loss(logp, logp.detach(), adv_L, mask, total_tokens=totals["total_tokens"],
                     total_seqs=totals["total_paths"], objective="ppo_clip", ref_logp_NT=ref_logp, entropy_NT=H,
                     reduction=reduction, t_max=10, **terms).loss
    g_want = grad_of(want)

    logp, H, mask = fwd.logprobs(compact, entropy="grad")
    with torch.no_grad():
        ref_logp, _, _ = rfwd.logprobs(compact)
    w_L = path_weights(len_L, reduction, t_max=10, **totals)
    a_NT, b_NT = tree_coefficients(spans, adv_L, w_L, tuple(logp.shape))
    assert ((b_NT > 0) == mask).all()  # every own token carries a coefficient, nothing else does
    got, _ = tree_loss(logp, a_NT, b_NT, ref_logp_NT=ref_logp, entropy_NT=H, **terms)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    g_got = grad_of(got)
    # float64 throughout, but the model's attention softmax and RMSNorm run in float32 inside transformers, and the
    # two layouts pad differently: agreement to float32's rounding (~6e-8), where a miscounted share moves it by >1e-2
    err = float((g_got - g_want).abs().max() / g_want.abs().max())
    assert err < 1e-6, err
    once, _ = tree_coefficients([pieces[-1:] for pieces in spans], adv_L, w_L, tuple(logp.shape))  # suffixes only
    logp, H, _ = fwd.logprobs(compact, entropy="grad")
    wrong, _ = tree_loss(logp, once, b_NT, ref_logp_NT=ref_logp, entropy_NT=H, **terms)
    assert float((grad_of(wrong) - g_want).abs().max() / g_want.abs().max()) > 1e-2
    # the shared tokens are trained once: the compact rows hold fewer target tokens than the paths
    assert int(mask.sum()) == 6 + 3 + 5 + 3 + 4 + 5 < int(len_L.sum())


@pytest.mark.parametrize("at", ["random", "highest_entropy"])
def test_grpo_on_trees_runs_and_reports_the_sampling_saving(tmp_path, at):
    data = tiny_cfg_dict(**{"grpo.steps": 2, "grpo.group_size": 4, "grpo.prompts_per_step": 2,
                            "grpo.micro_batch_size": 4, "grpo.tree": {"chains": 2, "forks": 2, "at": at}})
    cfg = parse_config(data)
    run(cfg, tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["tree_paths"] == 2 * 2 * (1 + 2)  # prompts x chains x (chain + its continuations)
        assert r["tokens_sampled"] < r["tree_path_tokens"]  # shared prefixes sampled once
        assert 0 < r["tree_sampled_frac"] < 1
        assert r["loss"] == r["loss"] and r["grad_norm"] is not None
    with pytest.raises(Exception, match="grpo.tree"):
        parse_config(tiny_cfg_dict(**{"grpo.tree": {"chains": 2, "forks": 2}, "grpo.inner_iterations": 2}))






