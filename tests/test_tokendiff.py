"""``forkrl diff`` (METHODS §3): the U/R/S taxonomy, ranks and entropy ratio on hand-built logits; a
hand-built bigram model pair whose forks, substitutions and pass@1 are known exactly; the two-model
decode reproducing the sampler token for token; streaming equals one batch; the command on real tiny
models (schema, base vs itself); tokenizer mismatch refused."""

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from forkrl import models
from forkrl.diagnostics import substitute, tokendiff
from forkrl.diagnostics.substitute import (CausalSetup, EntropyGate, Oracle, RandomControl, causal_test,
                                           control_plan, decode, rank_of, recovery)
from forkrl.diagnostics.tokendiff import PositionStats, classify, summarize, teacher_force
from forkrl.config import SamplingCfg
from forkrl.sampling import SamplingParams, make_sampler
from forkrl.sampling.decode import uniform as _uniform


def default_sampler(model, tok, batch_size=256):  # the default backend, as forkrl diff gets it
    return make_sampler(SamplingCfg(batch_size=batch_size), model, tok)
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict

LN2 = math.log(2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second OpenMP thread buys nothing and, on a CPU shared with other jobs,
    its barrier waits made single decode steps ~20x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(*probs):
    """float64 logits log p (−inf where p = 0), one row per distribution."""
    return torch.tensor(probs, dtype=torch.float64).log()


def _onehot(index, V=8, scale=10.0):
    z = torch.zeros(V, dtype=torch.float64)
    z[index] = scale
    return z


# ------------------------------------------------------------------------------------ pure math, by hand
def _hand_batch():
    """Row 0: four positions + one masked; row 1: one position. Classes at k=3: U R R S | U.

    pos 0  p_b = (1/2, 1/4, 1/8, 1/16, 1/32, 1/64, 1/128, 1/128)  H = 1.984375 ln2, tuned argmax 0: U
    pos 1  p_b = (1/4, 1/2, 1/8, 1/8, 0, 0, 0, 0)                   H = 1.75 ln2, tuned argmax 0: rank 2, R
    pos 2  p_b uniform over tokens 0..3                             H = 2 ln2, tuned argmax 2: tie-broken
                                                                    by id, tokens 0 and 1 precede: rank 3, R
    pos 3  p_b = (1/2, 1/8, 1/8, 1/8, 1/8, 0, 0, 0)                 H = 2 ln2, tuned argmax 7 (p_b = 0): the
                                                                    5 finite tokens and ids 5, 6 precede: rank 8, S
    """
    base = torch.zeros(2, 5, 8, dtype=torch.float64)
    base[0, 0] = _logits([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 128])
    base[0, 1] = _logits([1 / 4, 1 / 2, 1 / 8, 1 / 8, 0, 0, 0, 0])
    base[0, 2] = _logits([1 / 4] * 4 + [0] * 4)
    base[0, 3] = _logits([1 / 2] + [1 / 8] * 4 + [0] * 3)
    base[0, 4] = _logits([1 / 8] * 8)  # masked
    base[1, 0] = _logits([1 / 8] * 8)  # uniform: H = 3 ln2, tuned argmax 0 = base argmax (first max): U
    tuned = torch.stack([torch.stack([_onehot(i) for i in row]) for row in ([0, 0, 2, 7, 5], [0, 1, 1, 1, 1])])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return base, tuned, mask


def test_classify_taxonomy_ranks_and_entropy_by_hand():
    base, tuned, mask = _hand_batch()
    st = classify(base, tuned, mask, top_k=3)
    assert st.cls_NT.tolist() == [[0, 1, 1, 2, -1], [0, -1, -1, -1, -1]]
    assert st.rank_NT.tolist() == [[1, 2, 3, 8, 0], [1, 0, 0, 0, 0]]
    expected_H = [1.984375 * LN2, 1.75 * LN2, 2 * LN2, 2 * LN2]
    assert torch.allclose(st.H_NT[0, :4], torch.tensor(expected_H, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(float(st.H_NT[1, 0]) - 3 * LN2) < 1e-12
    assert st.H_NT[0, 4] == 0 and st.H_NT[1, 1:].eq(0).all()
    assert st.base_arg_NT[0, :4].tolist() == [0, 1, 0, 0] and st.tuned_arg_NT[0, :4].tolist() == [0, 0, 2, 7]
    assert st.base_top_NTK[0, 1].tolist()[:2] == [1, 0]
    assert torch.allclose(st.base_p_NTK[0, 1, :2], torch.tensor([0.5, 0.25], dtype=torch.float64), atol=1e-15)
    # with k = 2 the rank-3 position is SHIFTED
    assert classify(base, tuned, mask, top_k=2).cls_NT[0, :4].tolist() == [0, 1, 2, 2]


def test_summarize_by_hand():
    """Five positions: U R R S U. Means over positions; the ratio is (1.875 ln2) / (10.734375 ln2 / 5)."""
    base, tuned, mask = _hand_batch()
    agg = summarize(classify(base, tuned, mask, top_k=3), top_k=3)
    assert agg["num_positions"] == 5
    assert agg["fractions"] == {"unshifted": 2 / 5, "reranked": 2 / 5, "shifted": 1 / 5}
    assert agg["promoted_rank_hist"] == {"2": 1, "3": 1, ">3": 1}
    assert agg["promoted_rank_mean"] == 2.5  # over RERANKED positions only: (2 + 3) / 2
    e = agg["entropy"]
    assert abs(e["mean"] - (1.984375 + 1.75 + 2 + 2 + 3) / 5 * LN2) < 1e-12
    assert abs(e["reranked_mean"] - 1.875 * LN2) < 1e-12
    assert abs(e["unshifted_mean"] - (1.984375 + 3) / 2 * LN2) < 1e-12
    assert abs(e["ratio"] - 1.875 * 5 / 10.734375) < 1e-12
    # nothing reranked: the ratio and the promoted-rank mean are undefined, not 0
    none = summarize(classify(base, base, mask, top_k=3), top_k=3)
    assert none["fractions"]["unshifted"] == 1.0 and none["entropy"]["ratio"] is None
    assert none["promoted_rank_mean"] is None and none["promoted_rank_hist"] == {"2": 0, "3": 0, ">3": 0}


def test_rank_of_matches_a_naive_float64_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 4, (6, 9, 11), generator=g).double()  # many ties
    idx = torch.randint(0, 11, (6, 9), generator=g)
    rank = rank_of(z, idx)
    for n in range(6):
        for t in range(9):
            order = sorted(range(11), key=lambda v: (-float(z[n, t, v]), v))
            assert int(rank[n, t]) == order.index(int(idx[n, t])) + 1
            assert (int(rank[n, t]) == 1) == (int(idx[n, t]) == int(z[n, t].argmax()))


def test_entropy_threshold_and_recovery():
    H = torch.arange(100, dtype=torch.float64)
    tau, rule = tokendiff.entropy_threshold(H, reranked_frac=0.05)
    assert abs(tau - 94.05) < 1e-9 and int((H > tau).sum()) == 5 and "quantile" in rule
    assert tokendiff.entropy_threshold(H, 0.05, quantile=0.5)[0] == 49.5
    assert tokendiff.entropy_threshold(H, 0.05, tau=1.25) == (1.25, "--tau")
    assert tokendiff.entropy_threshold(H, 0.0)[0] == 99.0  # q = 1: the largest entropy seen
    assert tokendiff.entropy_threshold(H, 0.0, vocab_size=320)[0] == math.log(320)  # nothing reranked: never opens
    assert tokendiff.entropy_threshold(H, 0.0, quantile=1.0, vocab_size=320)[0] == 99.0
    assert recovery(0.5, 0.3, 0.7, num_samples=100) == pytest.approx(0.5, abs=1e-12)
    assert recovery(0.2, 0.3, 0.7, num_samples=100) == pytest.approx(-0.25, abs=1e-12)
    assert recovery(0.5, 0.3, 0.305, num_samples=100) is None  # gain below one sample's worth
    assert recovery(0.5, 0.3, 0.31, num_samples=100) is not None


def test_control_plan_draws_k_distinct_steps_inside_the_length():
    plan = control_plan(torch.tensor([0, 1, 3, 5]), torch.tensor([4, 6, 3, 9]), [11, 12, 13, 14], max_steps=12)
    assert plan.sum(1).tolist() == [0, 1, 3, 5]
    for r, n in enumerate([4, 6, 3, 9]):
        assert not plan[r, n:].any()
    again = control_plan(torch.tensor([0, 1, 3, 5]), torch.tensor([4, 6, 3, 9]), [11, 12, 13, 14], max_steps=12)
    assert torch.equal(plan, again)


# ------------------------------------------------------------------------------ a hand-built bigram pair
EOS, EQ, A, B, C, PAD = range(6)
SYMBOLS = {EQ: "=", A: "a", B: "b", C: "c"}


class Bigram(torch.nn.Module):
    """A 'language model' whose next-token logits depend only on the current token: logits = log P[token].
    Takes the Hugging Face forward arguments it is called with (there is no cache to keep)."""

    def __init__(self, table):
        super().__init__()
        self.logp = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        logits = self.logp[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, past_key_values=None)


class Chars:
    pad_token_id, eos_token_id = PAD, EOS

    def decode(self, ids, skip_special_tokens=False):
        specials = {EOS: "" if skip_special_tokens else "<eos>", PAD: "" if skip_special_tokens else "<pad>"}
        return "".join(SYMBOLS.get(i, specials.get(i, "")) for i in ids)


def _table(after_eq):
    """After '=': ``after_eq``; after a letter: EOS for sure; after EOS / pad: EOS."""
    eos = [1, 0, 0, 0, 0, 0]
    return [eos, after_eq, eos, eos, eos, eos]


BASE_BIGRAM = _table([0, 0, 1 / 2, 1 / 4, 1 / 4, 0])  # base prefers a; H after '=' = 1.5 ln2; 0 elsewhere
TUNED_BIGRAM = _table([0, 0, 1 / 4, 1 / 2, 1 / 4, 0])  # tuned prefers b (base rank 2)


class BTask:
    """Correct iff the completion is 'b'."""

    def score(self, problem, completion):
        return float(completion == "b")


def _bigram_rollouts(completions):
    rows = [[EQ] + c for c in completions]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), PAD)
    role = torch.zeros(len(rows), L, dtype=torch.int8)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        role[r, 0], role[r, 1 : len(row)] = Role.PROMPT, Role.COMPLETION
    N = len(rows)
    return Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=torch.zeros(N, L), group_N=torch.arange(N),
                    problem_N=torch.zeros(N, dtype=torch.long), truncated_N=torch.zeros(N, dtype=torch.bool))


def test_bigram_pair_teacher_forced_exactly():
    """'= b EOS': the position predicting b is RERANKED (rank 2, H = 1.5 ln2), the one predicting EOS is
    UNSHIFTED (H = 0); so the entropy ratio is exactly (1.5 ln2) / (0.75 ln2) = 2."""
    base, tuned = Bigram(BASE_BIGRAM), Bigram(TUNED_BIGRAM)
    traj = _bigram_rollouts([[B, EOS], [A, EOS], [C, EOS]])
    st = teacher_force(base, tuned, traj, top_k=3, micro_batch_size=2)
    assert st.cls_NT.tolist() == [[1, 0], [1, 0], [1, 0]]
    assert st.rank_NT.tolist() == [[2, 1], [2, 1], [2, 1]]
    agg = summarize(st, top_k=3)
    assert agg["fractions"] == {"unshifted": 0.5, "reranked": 0.5, "shifted": 0.0}
    assert abs(agg["entropy"]["reranked_mean"] - 1.5 * LN2) < 1e-6
    assert abs(agg["entropy"]["ratio"] - 2.0) < 1e-6 and agg["promoted_rank_mean"] == 2.0
    forks = tokendiff.fork_table(st, traj, Chars(), num=5)
    assert len(forks) == 1 and forks[0]["count"] == 3 and forks[0]["context"] == "=" and forks[0]["token"] == "b"
    assert forks[0]["base_top"][0] == ["a", 0.5] and forks[0]["tuned_top"][0] == ["b", 0.5]
    rows = tokendiff.heatmap_rows(st, traj, Chars(), [True, False, False], num=2)
    assert [r["tokens"] for r in rows] == [["b", "<eos>"], ["a", "<eos>"]]
    assert rows[0]["class"] == ["R", "U"] and rows[0]["correct"] and rows[0]["prompt"] == "="


def test_bigram_causal_test_exactly():
    """Row r's u = U(seed_r, 1) decides its first token: base a if u < 1/2, b if u < 3/4, else c; tuned a
    if u < 1/4, b if u < 3/4, else c. The oracle substitutes b at step 0 of every row (one substitution),
    so its pass@1 is 1; a gate with τ between 0 and 1.5 ln2 opens exactly there too."""
    base, tuned, tok = Bigram(BASE_BIGRAM), Bigram(TUNED_BIGRAM), Chars()
    params = SamplingParams(temperature=1.0, max_new_tokens=5)
    seeds = list(range(7, 7 + 3 * 20))
    u = _uniform(torch.tensor(seeds), 1)
    base_b, tuned_b = (u >= 0.5) & (u < 0.75), (u >= 0.25) & (u < 0.75)
    p_base, p_tuned = float(base_b.double().mean()), float(tuned_b.double().mean())
    setup = CausalSetup(BTask(), [None] * 20, [[EQ]] * 20, 3, params, seeds, SamplingCfg(batch_size=16))
    own, subs = decode(base, None, tok, setup.prompt_ids, 3, params, seeds, sampling=SamplingCfg(batch_size=16))
    assert subs.sum() == 0
    assert substitute.score_rollouts(BTask(), setup.problems, tok, own) == base_b.double().tolist()
    out = causal_test(base, tuned, tok, setup, p_base=p_base, p_tuned=p_tuned, top_k=3, tau=0.5)
    assert out["oracle"]["pass_at_1"] == 1.0 and out["oracle"]["substitutions_per_traj"] == 1.0
    assert out["oracle"]["recovery"] == pytest.approx((1 - p_base) / (p_tuned - p_base), abs=1e-12)
    assert out["entropy_gate"] == out["oracle"]
    never = causal_test(base, tuned, tok, setup, p_base=p_base, p_tuned=p_tuned, top_k=3, tau=2.0)["entropy_gate"]
    assert never["pass_at_1"] == p_base and never["substitutions_per_traj"] == 0.0 and never["recovery"] == 0.0
    # the control: one planned step in range(2) per row; at step 0 it emits b or c (the base's non-argmax
    # top-3); at step 1 only EOS has probability > 0, so nothing is substituted there
    plan = control_plan(torch.ones(60, dtype=torch.long), torch.full((60,), 2), seeds, 5)
    ctrl, ctrl_subs = decode(base, None, tok, setup.prompt_ids, 3, params, seeds, RandomControl(plan, 3),
                             sampling=SamplingCfg(batch_size=16))
    assert torch.equal(ctrl_subs, plan[:, 0].long())
    first = ctrl.input_ids_NL[:, 1]
    assert all(int(first[r]) in (B, C) for r in range(60) if plan[r, 0])
    assert torch.equal(ctrl.input_ids_NL[~plan[:, 0]], own.input_ids_NL[~plan[:, 0]])
    assert abs(out["random"]["substitutions_per_traj"] - float(plan[:, 0].double().mean())) < 1e-12


# --------------------------------------------------------------------------- real tiny transformer models
def _eos_heavy_copy(model_dir, tmp_path, name="eos", scale=60.0):
    """The tiny model with its (tied) EOS embedding scaled: EOS gets likely, so rows stop at different steps."""
    model, tok = models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= scale
    out = tmp_path / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _perturbed_copy(model_dir, out, noise=0.05, seed=1):
    """Noise on the attention and MLP output projections. (The untrained tiny model with tied embeddings
    predicts its current token; perturbing the embeddings too would keep that, and change no argmax.)"""
    model, tok = models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.add_(noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, tmp_path_factory):
    path = _eos_heavy_copy(tiny_model_dir, tmp_path_factory.mktemp("eos"))
    return models.load_model(str(path)), models.load_tokenizer(str(path))


def _prompts(tok):
    return [tok(t).input_ids for t in ("12+34=", "7+5=", "99+1=", "3+40=", "12+3=")]  # uneven: left padding


@pytest.mark.parametrize("params", [SamplingParams(1.0, 1.0, 0, 12), SamplingParams(0.7, 0.9, 20, 12),
                                    SamplingParams(0.0, 1.0, 0, 12)])
def test_decode_without_substitution_reproduces_the_sampler(eos_model, params):
    model, tok = eos_model
    prompts, seeds = _prompts(tok), list(range(500, 515))
    want = default_sampler(model, tok, batch_size=4).sample(prompts, 3, params, seeds=seeds)
    got, subs = decode(model, None, tok, prompts, 3, params, seeds, sampling=SamplingCfg(batch_size=4))
    lengths = want.completion_len_N
    if not params.greedy:
        assert lengths.min() < lengths.max() and want.truncated_N.any()  # rows stop at different steps
    for f in ("input_ids_NL", "role_NL", "sampler_logp_NL", "group_N", "problem_N", "truncated_N"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert subs.eq(0).all()
    # the tuned model equal to the base: the oracle never substitutes, and the rows are unchanged
    same, subs = decode(model, model, tok, prompts, 3, params, seeds, Oracle(5),
                        sampling=SamplingCfg(batch_size=4))
    assert subs.eq(0).all() and torch.equal(same.input_ids_NL, want.input_ids_NL)


def test_entropy_gate_always_open_on_the_base_itself_is_greedy(eos_model):
    """τ = −1 opens the gate at every step, where the 'tuned' argmax is the base's own: greedy decoding."""
    model, tok = eos_model
    prompts, seeds = _prompts(tok), list(range(500, 510))
    greedy = default_sampler(model, tok).sample(prompts, 2, SamplingParams(0.0, 1.0, 0, 12), seeds=seeds)
    gated, subs = decode(model, model, tok, prompts, 2, SamplingParams(1.0, 1.0, 0, 12), seeds, EntropyGate(-1.0),
                         sampling=SamplingCfg())
    assert torch.equal(gated.input_ids_NL, greedy.input_ids_NL)
    assert torch.equal(subs, greedy.completion_len_N)


class CountRows(torch.nn.Module):
    """Wraps a model and records the rows of every forward (to check the streaming bound)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, input_ids, **kw):
        self.rows.append(input_ids.shape[0])
        return self.model(input_ids=input_ids, **kw)


def test_streaming_equals_one_batch(eos_model, tiny_model_dir, tmp_path):
    model, tok = eos_model
    tuned = models.load_model(str(_perturbed_copy(tiny_model_dir, tmp_path / "tuned")))
    traj = default_sampler(model, tok).sample(_prompts(tok), 3, SamplingParams(1.0, 1.0, 0, 12), seeds=list(range(15)))
    whole = teacher_force(model, tuned, traj, 5, micro_batch_size=64)
    base_c, tuned_c = CountRows(model), CountRows(tuned)
    parts = teacher_force(base_c, tuned_c, traj, 5, micro_batch_size=4)
    assert base_c.rows == [4, 4, 4, 3] and tuned_c.rows == [4, 4, 4, 3]
    assert whole.mask_NT.sum() == traj.completion_mask_NL.sum()
    assert (whole.cls_NT > 0).any()  # the perturbation changed some argmaxes
    for f in ("mask_NT", "cls_NT", "rank_NT", "base_arg_NT", "tuned_arg_NT", "base_top_NTK", "tuned_top_NTK"):
        assert torch.equal(getattr(parts, f), getattr(whole, f)), f
    for f in ("H_NT", "base_p_NTK", "tuned_p_NTK"):
        assert (getattr(parts, f) - getattr(whole, f)).abs().max() < 1e-5, f


# ---------------------------------------------------------------------------------------------- the command
def _args(base, tuned, task, out, *extra):
    parser = argparse.ArgumentParser()
    tokendiff.add_arguments(parser)
    return parser.parse_args(["--base", str(base), "--tuned", str(tuned), "--task", str(task), "--out", str(out),
                              *extra])


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "diff.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict(**{"eval.num_problems": 6, "eval.samples_per_problem": 3})))
    return path


def _check_schema(d, top_k=5):
    f, opt = (int, float), (int, float, type(None))
    assert set(d) == {"base", "tuned", "samples_from", "top_k", "temperature", "num_trajectories", "num_positions",
                      "summary", "fractions", "promoted_rank_hist", "entropy", "forks", "causal", "trajectories",
                      "seconds"}
    assert set(d["summary"]) == {"agreement", "reranked", "shifted", "entropy_ratio", "oracle_recovery",
                                 "random_recovery", "entropy_gate_recovery", "promoted_rank_mean"}
    assert set(d["fractions"]) == {"unshifted", "reranked", "shifted"}
    assert abs(sum(d["fractions"].values()) - 1) < 1e-5
    assert list(d["promoted_rank_hist"]) == [str(r) for r in range(2, top_k + 1)] + [f">{top_k}"]
    assert set(d["entropy"]) == {"mean", "reranked_mean", "ratio", "unshifted_mean"}
    for fork in d["forks"]:
        assert set(fork) == {"context", "token", "base_entropy", "base_top", "tuned_top", "count"}
        assert isinstance(fork["count"], int) and all(isinstance(p, f) for _, p in fork["base_top"])
    c = d["causal"]
    assert set(c) == {"tau", "tau_rule", "samples_per_problem", "num_problems", "base", "tuned", "oracle", "random",
                      "entropy_gate"}
    for name in ("oracle", "random", "entropy_gate"):
        assert set(c[name]) == {"pass_at_1", "recovery", "substitutions_per_traj"}
        assert isinstance(c[name]["recovery"], opt) and isinstance(c[name]["pass_at_1"], f)
    for t in d["trajectories"]:
        assert set(t) == {"prompt", "correct", "tokens", "base_entropy", "class", "base_top", "tuned_top"}
        n = len(t["tokens"])
        assert n == len(t["base_entropy"]) == len(t["class"]) == len(t["base_top"]) == len(t["tuned_top"])
        assert set(t["class"]) <= {"U", "R", "S"}
    assert set(d["seconds"]) == {"sample", "teacher_force", "causal"}


def test_command_writes_a_schema_valid_diff(tiny_model_dir, task_yaml, tmp_path, capsys):
    tuned = _perturbed_copy(tiny_model_dir, tmp_path / "tuned")
    assert tokendiff.main(_args(tiny_model_dir, tuned, task_yaml, tmp_path / "out", "--samples-from", "both",
                                "--micro-batch-size", "5")) == 0
    d = json.loads((tmp_path / "out" / "diff.json").read_text())
    _check_schema(d)
    assert d["num_trajectories"] == 2 * 6 * 3 and d["samples_from"] == "both"
    assert d["causal"]["num_problems"] == 6 and d["causal"]["samples_per_problem"] == 3
    assert d["fractions"]["unshifted"] < 1.0 and d["forks"]
    assert sum(d["promoted_rank_hist"].values()) == round(d["num_positions"] * (1 - d["fractions"]["unshifted"]))
    assert "unshifted" in capsys.readouterr().out


def test_base_against_itself(tiny_model_dir, task_yaml, tmp_path):
    tok = models.load_tokenizer(str(tiny_model_dir))
    d = tokendiff.run_diff(str(tiny_model_dir), str(tiny_model_dir), str(task_yaml), out=tmp_path)
    _check_schema(d)
    assert d["fractions"] == {"unshifted": 1.0, "reranked": 0.0, "shifted": 0.0}
    assert d["summary"]["agreement"] == 1.0 and d["forks"] == [] and d["entropy"]["ratio"] is None
    c = d["causal"]
    for name in ("oracle", "random", "entropy_gate"):
        assert c[name]["substitutions_per_traj"] == 0.0 and c[name]["pass_at_1"] == c["base"]["pass_at_1"]
    assert c["tuned"]["pass_at_1"] == c["base"]["pass_at_1"] and c["tau"] == round(math.log(len(tok)), 6)
    assert c["oracle"]["recovery"] is None  # no gain to recover
    assert json.loads((tmp_path / "diff.json").read_text()) == d


def test_tokenizer_mismatch_is_refused(tiny_model_dir, task_yaml, tmp_path):
    other = models.build_tiny(tmp_path / "other", ["1+2= col ans 3", "4+5= direct ans 9"] * 20, arch="qwen2",
                              vocab_size=280, seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                              intermediate_size=64, max_positions=128)
    with pytest.raises(models.ModelLoadError, match="different tokenizers: vocabulary sizes differ"):
        tokendiff.main(_args(tiny_model_dir, other, task_yaml, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_options_are_user_errors(tiny_model_dir, task_yaml, tmp_path):
    from forkrl.config import ConfigError

    with pytest.raises(ConfigError, match="--top-k must be at least 2"):
        tokendiff.main(_args(tiny_model_dir, tiny_model_dir, task_yaml, tmp_path, "--top-k", "1"))
    with pytest.raises(ConfigError, match=r"--tau-quantile must lie in \[0, 1\]"):
        tokendiff.main(_args(tiny_model_dir, tiny_model_dir, task_yaml, tmp_path, "--tau-quantile", "1.5"))
    with pytest.raises(ConfigError, match="--micro-batch-size must be an integer >= 1, got 0; --fork-context must"):
        tokendiff.main(_args(tiny_model_dir, tiny_model_dir, task_yaml, tmp_path, "--micro-batch-size", "0",
                             "--fork-context", "-1"))
