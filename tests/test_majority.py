"""TTRL's majority-vote reward (rewards.majority, arXiv 2504.16084) and its label health (arXiv 2605.19444): a
hand-derived case, a naive-loop reference, and the reward on constructed completions (a majority known by
construction, ties, unparseable answers) through the loader and scorer, then in a GRPO run that logs the ttrl_*
metrics and resumes to the uninterrupted run's flips."""

import dataclasses
import json
import random

import pytest
import torch

from forkrl.config import RewardCfg, parse_config
from forkrl.pipeline import run
from forkrl.rewards import RewardError, load, score_rollouts
from forkrl.rewards.majority import Vote, group_vote, health, majority_scores, vote
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict

TASK = ArithmeticTask(digits=2, train_size=50, heldout_size=10)
P = TASK.problems("train")


def rollouts(group_sizes):
    """Rollouts whose group g holds ``group_sizes[g]`` rows of problem g (only the bookkeeping matters)."""
    group = torch.tensor([g for g, n in enumerate(group_sizes) for _ in range(n)])
    N, L = len(group), 4
    role = torch.full((N, L), int(Role.PROMPT), dtype=torch.int8)
    role[:, 2:] = int(Role.COMPLETION)
    return Rollouts(input_ids_NL=torch.zeros(N, L, dtype=torch.long), role_NL=role, sampler_logp_NL=torch.zeros(N, L),
                    group_N=group, problem_N=group.clone(), truncated_N=torch.zeros(N, dtype=torch.bool))


def scores(texts_by_group, problems=P, **kwargs):
    loaded = load([RewardCfg(name="majority", kwargs=kwargs)], TASK, where="grpo.rewards", timeout_s=5.0)
    texts = [t for g in texts_by_group for t in g]
    scored, failures = score_rollouts(rollouts([len(g) for g in texts_by_group]), texts, problems, TASK, loaded,
                                      seeds=list(range(len(texts))))
    assert failures.count == 0
    return scored.reward_N.tolist()


def ans(x) -> str:
    return f"col 1+2=3 ; ans {x}"


# ---- hand-derived. Problems 0, 1, 2 with gold g0, g1, g2; w, w2 wrong; G = 4.
#  group  answers            label  R_i        right       label right  R = right per row   punished minority
#  A      g0 g0 w  (none)    g0     1 1 0 0    1 1 0 0     yes          4 of 4              no
#  B      w  w  g1 w2        w      1 1 0 0    0 0 1 0     no           1 of 4 (the last)   yes
#  C      (none) ×4          none   0 0 0 0    0 0 0 0     no (none)    4 of 4              no
# label accuracy 1/3, reward accuracy 9/12, punished minority 1/3, no label 1/3.
# last labels {0: g0, 1: "999"}: A and B revisited; A kept g0, B moved "999" → w: flip rate 1/2.
def hand_votes():
    g = [int(p.answer) for p in P[:3]]
    texts = [[ans(g[0]), ans(g[0]), ans(g[0] + 1), "col no answer"],
             [ans(g[1] + 1), ans(g[1] + 1), ans(g[1]), ans(g[1] + 2)],
             ["x", "guess", "", "ans"]]
    return texts, [group_vote(TASK, P[i], t) for i, t in enumerate(texts)]


def test_hand_derived_votes_rewards_and_health():
    texts, votes = hand_votes()
    g0, g1 = P[0].answer, P[1].answer
    assert [v.label for v in votes] == [g0, str(int(g1) + 1), None]
    assert [v.scores for v in votes] == [(1, 1, 0, 0), (1, 1, 0, 0), (0, 0, 0, 0)]
    assert [v.correct for v in votes] == [(True, True, False, False), (False, False, True, False), (False,) * 4]
    assert [v.label_correct for v in votes] == [True, False, False]
    out = health(votes, {P[0].id: g0, P[1].id: "999"})
    assert out == {"ttrl_label_accuracy": 1 / 3, "ttrl_reward_accuracy": 0.75, "ttrl_flip_rate": 0.5,
                   "ttrl_punished_minority": 1 / 3, "ttrl_no_label_frac": 1 / 3, "ttrl_revisited": 2}
    # the scorer gives the same rewards as the votes, and reads no gold: a wrong gold changes nothing
    assert scores(texts) == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    no_gold = [dataclasses.replace(p, answer="") for p in P]
    assert scores(texts, problems=no_gold) == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert group_vote(TASK, no_gold[0], texts[0]).correct is None  # no gold: no verdicts, no health figures
    assert health([group_vote(TASK, no_gold[0], texts[0])], {})["ttrl_label_accuracy"] is None


def test_worked_cases_of_the_docstring():
    assert vote(["12", None, "13", "12", "13"]) == "12"
    assert vote(["12", None, "13", "12", "13"], ties="none") is None
    assert vote([None, ""]) is None and majority_scores([None, ""]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="ties='coin'"):
        vote(["1"], ties="coin")


# ---- a naive-loop reference: counts by scanning, the first answer (in row order) that reaches the top count wins
def naive_vote(answers, ties):
    order, count = [], {}
    for a in answers:
        if a is None or a == "":
            continue
        if a not in count:
            order.append(a)
            count[a] = 0
        count[a] += 1
    if not order:
        return None
    top = max(count.values())
    winners = [a for a in order if count[a] == top]
    if ties == "none" and len(winners) > 1:
        return None
    return winners[0]


@pytest.mark.parametrize("ties", ["first", "none"])
def test_vote_matches_a_naive_loop(ties):
    rng = random.Random(0)
    for _ in range(2000):
        answers = [rng.choice(["1", "2", "3", None, ""]) for _ in range(rng.randint(1, 9))]
        label = naive_vote(answers, ties)
        assert vote(answers, ties) == label, answers
        expected = [1.0 if label is not None and a == label else 0.0 for a in answers]
        assert majority_scores(answers, ties) == expected


def test_health_matches_a_naive_loop():
    rng = random.Random(1)
    for _ in range(200):
        votes, last = [], {}
        for q in range(rng.randint(1, 6)):
            G = rng.randint(1, 5)
            right = tuple(rng.random() < 0.3 for _ in range(G))
            label = rng.choice(["a", "b", None])
            gold = rng.random() < 0.8
            votes.append(Vote(f"q{q}", label, tuple(float(rng.random() < 0.5) for _ in range(G)),
                              right if gold else None, rng.random() < 0.5 if gold else None))
            if rng.random() < 0.5:
                last[f"q{q}"] = rng.choice(["a", "b", None])
        out = health(votes, last)
        n_gold = n_label = n_rows = n_match = n_punished = n_seen = n_flips = 0
        for v in votes:
            if v.problem_id in last:
                n_seen += 1
                n_flips += last[v.problem_id] != v.label
            if v.correct is None:
                continue
            n_gold += 1
            n_label += v.label_correct
            n_punished += (not v.label_correct) and any(v.correct)
            for s, c in zip(v.scores, v.correct):
                n_rows += 1
                n_match += s == float(c)
        assert out["ttrl_label_accuracy"] == (n_label / n_gold if n_gold else None)
        assert out["ttrl_reward_accuracy"] == (n_match / n_rows if n_rows else None)
        assert out["ttrl_punished_minority"] == (n_punished / n_gold if n_gold else None)
        assert out["ttrl_flip_rate"] == (n_flips / n_seen if n_seen else None) and out["ttrl_revisited"] == n_seen
        assert out["ttrl_no_label_frac"] == sum(v.label is None for v in votes) / len(votes)


# ---- constructed completions through the loader and the scorer
def test_a_majority_known_by_construction_ties_and_unparseable_answers():
    # group 0: 3 × 40, 2 × 41, one without an answer → 40; group 1: 2 × 7, 2 × 8 (tie, 7 first); group 2: none
    groups = [[ans(40), ans(41), ans(40), "no answer", ans(41), ans(40)], [ans(7), ans(8), ans(8), ans(7)],
              ["nothing", "ans"]]
    assert scores(groups) == [1, 0, 1, 0, 0, 1] + [1, 0, 0, 1] + [0, 0]
    assert scores(groups, ties="none") == [1, 0, 1, 0, 0, 1] + [0, 0, 0, 0] + [0, 0]
    # the last "ans N" is the answer, as the verifier reads it; a longer completion is not a different vote
    assert scores([[ans(5), "col 2+2=4 ; ans 9 ; ans 5", ans(6)]]) == [1, 1, 0]


def test_rows_permuted_within_a_group_permute_their_rewards():
    rng = random.Random(2)
    for ties in ("first", "none"):
        for _ in range(20):
            group = [rng.choice([ans(1), ans(2), ans(3), "none"]) for _ in range(6)]
            order = list(range(6))
            rng.shuffle(order)
            a, b = scores([group], ties=ties), scores([[group[i] for i in order]], ties=ties)
            if ties == "none" or vote([TASK.extract(t) for t in group]) == vote([TASK.extract(group[i]) for i in order]):
                assert b == [a[i] for i in order]


def test_what_the_loader_refuses():
    class Bare:
        name = "bare"

        def score(self, problem, completion):
            return 0.0

    with pytest.raises(RewardError, match="'majority' reward votes with the answers the task extracts"):
        load([RewardCfg(name="majority")], Bare(), where="grpo.rewards", timeout_s=1.0)
    with pytest.raises(RewardError, match="group-mode reward; remove mode: row"):
        load([RewardCfg(name="majority", mode="row")], TASK, where="grpo.rewards", timeout_s=1.0)
    with pytest.raises(RewardError, match="kwargs.ties='coin'"):
        load([RewardCfg(name="majority", kwargs={"ties": "coin"})], TASK, where="grpo.rewards", timeout_s=1.0)
    (loaded,) = load([RewardCfg(name="majority", mode="group")], TASK, where="grpo.rewards", timeout_s=1.0)
    assert loaded.mode == "group"


def test_every_task_with_answers_can_extract_them(tmp_path):
    from forkrl.tasks.jsonl import JsonlTask
    from forkrl.tasks.rgym import ReasoningGymTask

    for split in ("train", "heldout"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": f"{split}?", "answer": "4"}) + "\n")
    jsonl = JsonlTask(str(tmp_path / "train.jsonl"), str(tmp_path / "heldout.jsonl"))
    assert [jsonl.extract(c) for c in ("<answer> 4 </answer>", "Answer: 5\nmore", "   \n")] == ["4", "5", None]
    rg = ReasoningGymTask("basic_arithmetic", size=4, heldout_size=2, seed=0)
    assert [rg.extract(c) for c in ("<answer> 3 </answer>", "<answer></answer>", "no tags")] == ["3", None, None]


# ---- in a GRPO run: the metrics are logged, and a resumed run's flips equal the uninterrupted run's
def ttrl_config():
    return parse_config(tiny_cfg_dict(**{"grpo.steps": 5, "checkpoint.every": 2, "task.train_size": 8,
                                         "grpo.rewards": [{"name": "majority"}]}))


def ttrl_lines(run_dir):
    keep = ("step", "ttrl_label_accuracy", "ttrl_reward_accuracy", "ttrl_flip_rate", "ttrl_punished_minority",
            "ttrl_no_label_frac", "ttrl_revisited", "reward_mean")
    metrics = [{k: r.get(k) for k in keep} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    votes = [json.loads(x) for x in (run_dir / "majority.jsonl").read_text().splitlines()]
    return metrics, votes


def test_a_grpo_run_logs_label_health_and_resumes_to_the_same_flips(tmp_path, monkeypatch):
    run(ttrl_config(), tmp_path / "a")
    metrics, votes = ttrl_lines(tmp_path / "a")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5] and len(votes) == 5 * 4
    # 8 problems, 4 a step: steps 1-2 see each once, so nothing is revisited before step 3
    assert [m["ttrl_revisited"] for m in metrics] == [0, 0, 4, 4, 4]
    assert metrics[0]["ttrl_flip_rate"] is None and all(m["ttrl_flip_rate"] is not None for m in metrics[2:])
    for m in metrics:
        assert 0 <= m["ttrl_label_accuracy"] <= 1 and 0 <= m["ttrl_reward_accuracy"] <= 1
    for v in votes:  # a line's shares are what its group's rewards were
        assert set(v) == {"stage", "step", "problem_id", "label", "label_correct", "majority_share", "correct_share"}

    import forkrl.trainers.loop as common

    real = common.maybe_checkpoint

    def crash_after_step_3(ctx, step, *args, **kw):
        real(ctx, step, *args, **kw)
        if step == 3:
            raise KeyboardInterrupt  # step 3 ran and wrote its votes, but was not checkpointed

    monkeypatch.setattr(common, "maybe_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(ttrl_config(), tmp_path / "b")
    monkeypatch.setattr(common, "maybe_checkpoint", real)
    run(ttrl_config(), tmp_path / "b", resume=True)
    assert ttrl_lines(tmp_path / "b") == (metrics, votes)
