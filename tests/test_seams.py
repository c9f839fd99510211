"""The two seams carry a second implementation: a fake sampler registered as a backend (``sampling.SAMPLERS``) and
the fake policy forward it offers drive a GRPO stage end to end through the real pipeline, with the weight-sync hook
called after every optimizer step; a backend without a forward of its own gets the model's; one without the decode's
entropies still gets the fork stage's. (The accumulation routine's other plans: tests/test_check.py.)"""

import json

import torch

from forkrl.config import SamplingCfg, parse_config
from forkrl.forward import ModelForward, make_forward
from forkrl.pipeline import run
from forkrl.sampling import SAMPLERS, Sampler, SamplingParams
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict

ANSWERS = (" 12", " 7", " 99")


class FakeSampler:
    """Each row's completion is one of ``ANSWERS``, chosen by its seed; the model never runs. It offers its own
    policy forward, as a backend with its own engine could."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.syncs, self.forwards = tokenizer, 0, 0, []

    def sample(self, prompt_ids, group_size, params, *, seeds):
        self.calls += 1
        tok = self.tokenizer
        rows = [(p, tok(ANSWERS[seeds[i * group_size + j] % 3], add_special_tokens=False).input_ids
                 [: params.max_new_tokens - 1] + [tok.eos_token_id], i)
                for i, p in enumerate(prompt_ids) for j in range(group_size)]
        width = max(len(p) + len(c) for p, c, _ in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        role = torch.zeros(len(rows), width, dtype=torch.int8)
        for r, (p, c, _) in enumerate(rows):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            role[r, : len(p)], role[r, len(p) : len(p) + len(c)] = Role.PROMPT, Role.COMPLETION
        problem = torch.tensor([i for *_, i in rows])
        return Rollouts(ids, role, torch.zeros(len(rows), width), problem.clone(), problem,
                        torch.zeros(len(rows), dtype=torch.bool))

    def sync_weights(self):
        self.syncs += 1

    def policy_forward(self, model):
        self.forwards.append(CountingForward(model))
        return self.forwards[-1]


class CountingForward:
    """A policy forward of its own (it delegates the arithmetic to the model's forward, and counts)."""

    def __init__(self, model):
        self.model, self.inner, self.calls, self.replayed = model, ModelForward(model), 0, 0

    def logprobs(self, batch, rows_N=None, *, temperature=1.0, entropy="none"):
        self.calls += 1
        self.replayed += 1  # as a backend that answers from its own engine would report it
        return self.inner.logprobs(batch, rows_N, temperature=temperature, entropy=entropy)


def test_a_fake_sampler_and_forward_drive_a_grpo_stage(tmp_path, monkeypatch):
    made = []

    def fake(cfg, model, tokenizer, device, record):
        made.append((FakeSampler(tokenizer), record))
        return made[-1][0]

    monkeypatch.setitem(SAMPLERS, "fake", fake)
    cfg = parse_config(tiny_cfg_dict(**{"sampling.backend": "fake", "grpo.steps": 3,
                                        "grpo.rewards": [{"name": "random"}]}))
    summary = run(cfg, tmp_path / "r")
    rollout, eval_sampler = [s for s, record in made if record], [s for s, record in made if not record]
    assert len(rollout) == 1 and len(eval_sampler) == 1 and isinstance(rollout[0], Sampler)
    assert rollout[0].calls == 3 and eval_sampler[0].calls == 1  # one call a step; the final evaluation
    assert rollout[0].syncs == eval_sampler[0].syncs == 3  # after every optimizer step, every sampler of the stage
    forward = rollout[0].forwards[0]
    assert forward.calls >= 3
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["replayed_decode"] for r in rows)
    tok_len = {len(eval_sampler[0].tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in ANSWERS}
    assert {r["completion_len_min"] for r in rows} <= tok_len  # the fake's rows, not the model's
    assert 0.0 <= summary["stages"]["grpo"]["pass_at_1"] <= 1.0


def test_without_its_own_forward_a_backend_gets_the_models():
    class Plain:
        tokenizer = None

        def sample(self, prompt_ids, group_size, params, *, seeds):
            raise AssertionError

        def sync_weights(self):
            pass

    model = torch.nn.Linear(2, 2)
    assert isinstance(make_forward(model, Plain()), ModelForward) and isinstance(make_forward(model), ModelForward)


def test_the_fork_stage_teacher_forces_the_entropy_for_a_backend_without_it(tiny_model_dir):
    """``fork_data.sample_with_entropy``: a plain ``Sampler`` gets the same entropies the decode gives."""
    from forkrl.models import load_model, load_tokenizer
    from forkrl.sampling import make_sampler
    from forkrl.trainers.fork_data import sample_with_entropy

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [tok(t).input_ids for t in ("12+34=", "7+5=")]
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=8)
    sampler = make_sampler(SamplingCfg(backend="hf"), model, tok)

    class SampleOnly:  # the same sampler, with only the protocol's methods
        tokenizer = tok

        def sample(self, *a, **k):
            return sampler.sample(*a, **k)

        def sync_weights(self):
            pass

    want = sample_with_entropy(sampler, model, prompts, 3, params, seeds=list(range(6)))
    got = sample_with_entropy(SampleOnly(), model, prompts, 3, params, seeds=list(range(6)))
    assert torch.equal(got[0].input_ids_NL, want[0].input_ids_NL)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    assert (want[1] > 0).any()


def test_the_cpu_path_and_the_trainers_stay_behind_their_seams():
    """``forkrl/cpu`` is imported by the sampler factory alone; the diagnostics import no trainer module."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "forkrl"

    def imports(path: Path) -> set[str]:
        package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                out.add(f"{base}.{node.module}" if node.level and node.module else node.module or base)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return out

    users = {str(p.relative_to(root)) for p in root.rglob("*.py") if not p.is_relative_to(root / "cpu")
             and any(m == "forkrl.cpu" or m.startswith("forkrl.cpu.") for m in imports(p))}
    assert users == {"sampling/base.py"}
    for p in (root / "diagnostics").rglob("*.py"):
        assert not [m for m in imports(p) if m.startswith("forkrl.trainers")], p
