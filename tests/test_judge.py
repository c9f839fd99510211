"""LLM judges (``rewards.judge``): an OpenAI-compatible endpoint, faked on 127.0.0.1 with scripted good,
malformed, slow and failing replies, and a local judge on the tiny causal LM. A judgement without a verdict makes
its row unscorable (None), never 0; the response cache means a second judge over the same rows asks nothing."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from forkrl.config import RewardCfg
from forkrl.rewards import RewardError, load, score_rollouts
from forkrl.rewards.judge import JudgeCfg, build_judge, parse_verdict
from forkrl.tasks.base import Problem

KEY = "sk-test-123"


class FakeEndpoint:
    """A chat-completions server whose reply is decided by markers in the judge prompt: ``SLOW`` (sleeps past the
    client's timeout), ``FAIL_ONCE`` (HTTP 500 the first time), ``ALWAYS500``, ``RATE_ONCE`` (429 the first
    time), ``BAD_REQUEST`` (400, never worth a retry), ``MALFORMED`` (no verdict),
    ``SCORE=<text>`` (that text); else Yes when the response contains ``good``. It counts POSTs, each prompt's
    requests, and the most requests it served at once."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.posts, self.by_prompt, self.bodies = delay, 0, {}, []
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, obj):
                data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, {"error": "bad key"})
                self._send(200, {"data": [{"id": "judge-1"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.posts += 1
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                    fake.bodies.append(body)
                    user = body["messages"][-1]["content"]
                    nth = fake.by_prompt[user] = fake.by_prompt.get(user, 0) + 1
                try:
                    time.sleep(fake.delay)
                    fake.respond(self, user, nth)
                finally:
                    with fake.lock:
                        fake.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that timed out and left
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def settle(self, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
        """Wait until no request is in flight and none has arrived for ``quiet_s``: the judge returns once a row is
        decided, and a request it no longer needs may still be retrying (it finishes on its own, by design)."""
        end, last, since = time.monotonic() + limit_s, -1, time.monotonic()
        while time.monotonic() < end:
            with self.lock:
                state = (self.posts, self.active)
            if state[1] or state[0] != last:
                last, since = state[0], time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.02)

    def respond(self, handler, user: str, nth: int):
        if "ALWAYS500" in user or ("FAIL_ONCE" in user and nth == 1):
            return handler._send(500, {"error": "overloaded"})
        if "RATE_ONCE" in user and nth == 1:
            handler.send_response(429)
            handler.send_header("Retry-After", "0")
            handler.send_header("Content-Length", "0")
            return handler.end_headers()
        if "BAD_REQUEST" in user:
            return handler._send(400, {"error": "context too long"})
        if "SLOW" in user:
            time.sleep(2.5)
        if "SCORE=" in user:
            reply = user.split("SCORE=")[1].split("\n")[0]
        elif "MALFORMED" in user:
            reply = "I would rather not say."
        else:
            criterion = user.split("Criterion: ")[1].split("\n")[0]
            response = user.split("Response:\n")[1].split("\n\nCriterion")[0]
            reply = "Yes" if "good" in response and "never" not in criterion.lower() else "No"
        handler._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def requests_for(self, marker: str) -> int:
        return sum(n for user, n in self.by_prompt.items() if marker in user)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def endpoint(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    fake = FakeEndpoint()
    yield fake
    fake.close()


def _cfg(endpoint, **kw) -> JudgeCfg:
    return JudgeCfg(**{"kind": "openai", "base_url": endpoint.url, "model": "judge-1", "api_key_env": "JUDGE_KEY",
                       "timeout_s": 1.0, "retries": 1, "backoff_s": 0.01, **kw})


def _problems(n, **meta):
    return [Problem(id=f"p{i}", prompt=f"What is {i}+{i}?", answer=str(2 * i), meta=dict(meta)) for i in range(n)]


def _judge(j, completions, problems=None):
    problems = problems or _problems(len(completions))
    return j(prompts=[p.prompt for p in problems], completions=completions, answers=[p.answer for p in problems],
             problems=problems)


def test_endpoint_replies_good_malformed_slow_and_failing(endpoint):
    j = build_judge(_cfg(endpoint), task=None, device=None, where="grpo.rewards[0]", run_dir=None)
    out = _judge(j, ["good", "bad", "good MALFORMED", "good SLOW", "good FAIL_ONCE", "good RATE_ONCE",
                     "good BAD_REQUEST"])
    assert [None if v is None else v["score"] for v in out] == [1.0, 0.0, None, None, 1.0, 1.0, None]
    assert out[0] == {"score": 1.0, "correct": 1.0}
    assert endpoint.requests_for("SLOW") == 2  # timed out, retried once, timed out again: unscorable
    assert endpoint.requests_for("FAIL_ONCE") == 2  # HTTP 500, then retried and answered
    assert endpoint.requests_for("RATE_ONCE") == 2 and endpoint.requests_for("BAD_REQUEST") == 1
    (body,) = [b for b in endpoint.bodies if "What is 0+0?" in b["messages"][-1]["content"]]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-1", 0, 32)
    assert "Reference answer: 0\n" in body["messages"][-1]["content"]


def test_a_batch_with_no_verdict_at_all_raises_with_the_reason(endpoint):
    j = build_judge(_cfg(endpoint, retries=2), task=None, device=None, where="t", run_dir=None)
    with pytest.raises(ValueError, match="scored none of the 2 rows.*HTTP 500.*after 3 attempts"):
        _judge(j, ["ALWAYS500 a", "ALWAYS500 b"])
    assert endpoint.requests_for("ALWAYS500") == 6


def test_rubric_score_is_the_weighted_mean_and_each_criterion_is_logged(endpoint):
    criteria = [{"name": "right", "description": "Is it right?", "weight": 1.0},
                {"name": "terse", "description": "Is it never wordy?", "weight": 3.0}]
    j = build_judge(_cfg(endpoint, criteria=criteria), task=None, device=None, where="t", run_dir=None)
    assert _judge(j, ["good", "bad"]) == [{"score": 0.25, "right": 1.0, "terse": 0.0},
                                          {"score": 0.0, "right": 0.0, "terse": 0.0}]


def test_score_verdicts_are_parsed_and_out_of_range_is_unscorable(endpoint):
    j = build_judge(_cfg(endpoint, parse="score"), task=None, device=None, where="t", run_dir=None)
    out = _judge(j, ["SCORE=8/10", "SCORE=Score: 3", "SCORE=11", "SCORE=no idea", "SCORE=I see 2 errors; 7.5"])
    assert [None if v is None else v["score"] for v in out] == [0.8, 0.3, None, None, 0.75]


def test_parse_verdict_choices_patterns_and_scales():
    yes_no = JudgeCfg(kind="openai", base_url="http://x", model="m")
    assert [parse_verdict(r, yes_no) for r in ("Yes", "no.", "**YES**", "Yesterday", "", None, "No... yes")] == \
        [1.0, 0.0, 1.0, None, None, None, 1.0]  # the last whole-word choice is the verdict
    graded = JudgeCfg(kind="openai", base_url="http://x", model="m", choices={"A": 1.0, "B": 0.5, "C": 0.0})
    assert parse_verdict("Grade: B", graded) == 0.5
    five = JudgeCfg(kind="openai", base_url="http://x", model="m", parse="score", scale=5,
                    pattern=r"<score>(\d)</score>")
    assert (parse_verdict("3 steps <score>4</score>", five), parse_verdict("4", five)) == (0.8, None)


def test_identical_judgements_are_asked_once(endpoint):
    j = build_judge(_cfg(endpoint), task=None, device=None, where="t", run_dir=None)
    problem = _problems(1)
    assert _judge(j, ["good"] * 4, problem * 4) == [{"score": 1.0, "correct": 1.0}] * 4
    assert endpoint.posts == 1


def test_concurrency_is_bounded(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    fake = FakeEndpoint(delay=0.1)
    try:
        j = build_judge(_cfg(fake, max_concurrency=3, timeout_s=5.0), task=None, device=None, where="t",
                        run_dir=None)
        out = _judge(j, [f"good {i}" for i in range(12)])
        assert all(v["score"] == 1.0 for v in out) and fake.posts == 12
        assert 2 <= fake.max_active <= 3
    finally:
        fake.close()


def test_the_cache_makes_a_second_judge_ask_nothing(endpoint, tmp_path):
    cfg = _cfg(endpoint, criteria=["Is it right?", "Is it short?"])
    first = build_judge(cfg, task=None, device=None, where="t", run_dir=tmp_path)
    completions = ["good", "bad", "good MALFORMED", "good ALWAYS500"]
    expected = _judge(first, completions)
    endpoint.settle()
    assert endpoint.posts == 10  # 8 judgements, the 2 failing ones retried
    again = build_judge(cfg, task=None, device=None, where="t", run_dir=tmp_path)
    assert _judge(again, completions[:3]) == expected[:3] and endpoint.posts == 10  # malformed replies are kept
    with pytest.raises(ValueError, match="HTTP 500"):  # failed requests are not kept: asked again
        _judge(again, completions[3:])
    endpoint.settle()
    assert endpoint.posts == 14
    # a crash mid-write leaves a torn line: it is skipped, and what is appended after it reads back whole
    (cache,) = (tmp_path / "judge-cache").iterdir()
    lines = cache.read_text().splitlines()
    with open(cache, "a") as f:
        f.write(lines[0][:30])
    third = build_judge(cfg, task=None, device=None, where="t", run_dir=tmp_path)
    assert _judge(third, completions[:3] + ["good again"]) == expected[:3] + [expected[0]]
    assert endpoint.posts == 16
    rows = cache.read_text().splitlines()
    assert len(rows) == len(lines) + 3 and all("key" in json.loads(r) for r in rows[:len(lines)] + rows[-2:])
    # another model is another judge: nothing of the first one's is reused
    other = build_judge(_cfg(endpoint, model="judge-2", criteria=["Is it right?", "Is it short?"]), task=None,
                        device=None, where="t", run_dir=tmp_path)
    _judge(other, completions[:1])
    assert endpoint.posts == 18 and len(list((tmp_path / "judge-cache").iterdir())) == 2


def test_key_endpoint_and_template_errors_at_build(endpoint, monkeypatch):
    def refused(match, **kw):
        with pytest.raises(RewardError, match=match):
            build_judge(_cfg(endpoint, **kw), task=None, device=None, where="grpo.rewards[1]", run_dir=None)

    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    refused(r"grpo.rewards\[1\].judge.api_key_env: the environment variable NO_SUCH_KEY is not set",
            api_key_env="NO_SUCH_KEY")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    refused(f"cannot reach the judge endpoint {dead}/models", base_url=dead)
    monkeypatch.setenv("WRONG_KEY", "sk-wrong")
    refused(r"refused the key \(HTTP 401\) from \$WRONG_KEY", api_key_env="WRONG_KEY")
    refused(r"unknown fields \['rubric'\]", template="{completion} {rubric}")
    refused(r"never shows the judge the \{completion\}", template="{prompt} {criterion}")
    with pytest.raises(ValueError, match="criteria names repeat"):
        _cfg(endpoint, criteria=[{"name": "a", "description": "x"}, {"name": "a", "description": "y"}])
    with pytest.raises(ValueError, match="method choice reads token probabilities"):
        _cfg(endpoint, method="choice")
    with pytest.raises(ValueError, match="at most one of criteria, criteria_file"):
        _cfg(endpoint, criteria=["x"], criteria_field="rubric")
    with pytest.raises(ValueError, match="batch_size: for a judge of kind hf, not openai"):
        _cfg(endpoint, batch_size=4)
    with pytest.raises(ValueError, match="is not a regular expression"):
        _cfg(endpoint, pattern="(unclosed")


def test_criteria_from_a_file_relative_to_the_current_directory(endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rubric.yaml").write_text("criteria:\n  - {name: right, description: 'Is it right?', weight: 2}\n"
                                          "  - Is it never wordy?\n")
    (tmp_path / "rubric.json").write_text(json.dumps(["Is it right?"]))
    j = build_judge(_cfg(endpoint, criteria_file="rubric.yaml"), task=None, device=None, where="t", run_dir=None)
    assert _judge(j, ["good"]) == [{"score": 2 / 3, "right": 1.0, "c2": 0.0}]
    j = build_judge(_cfg(endpoint, criteria_file="rubric.json"), task=None, device=None, where="t", run_dir=None)
    assert _judge(j, ["good"]) == [{"score": 1.0, "c1": 1.0}]
    with pytest.raises(RewardError, match="criteria_file: .*missing.yaml does not exist"):
        build_judge(_cfg(endpoint, criteria_file="missing.yaml"), task=None, device=None, where="t", run_dir=None)


class RubricTask:
    name = "rubric"

    def __init__(self, problems):
        self._problems = problems

    def problems(self, split):
        return self._problems if split == "train" else []


def test_criteria_per_problem_from_its_metadata(endpoint):
    problems = [Problem("a", "Q1", "", {"rubric": ["Is it right?"]}),
                Problem("b", "Q2", "", {"rubric": [{"name": "style", "description": "Never wordy?", "weight": 1},
                                                   {"name": "right", "description": "Right?", "weight": 1}]})]
    j = build_judge(_cfg(endpoint, criteria_field="rubric"), task=RubricTask(problems), device=None, where="t",
                    run_dir=None)
    assert _judge(j, ["good", "good"], problems) == [{"score": 1.0, "c1": 1.0},
                                                     {"score": 0.5, "style": 0.0, "right": 1.0}]
    assert all("Reference answer: (none given)" in b["messages"][-1]["content"] for b in endpoint.bodies)
    unlisted = Problem("c", "Q3", "", {})
    assert _judge(j, ["good", "good"], [problems[0], unlisted]) == [{"score": 1.0, "c1": 1.0}, None]
    with pytest.raises(RewardError, match=r"criteria_field: problem 'c' has no 'rubric' field"):
        build_judge(_cfg(endpoint, criteria_field="rubric"), task=RubricTask(problems + [unlisted]), device=None,
                    where="t", run_dir=None)


# ---------------------------------------------------------------------------------------------------- local judge


def _hand_choice(model_dir, texts):
    """P(Yes) / (P(Yes) + P(No)) at the position after each text, from one unpadded forward per text."""
    from forkrl.models import load_model, load_tokenizer

    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    ids = [tok("Yes", add_special_tokens=False).input_ids[0], tok("No", add_special_tokens=False).input_ids[0]]
    out = []
    for text in texts:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(text).input_ids])).logits[0, -1]
        out.append(torch.softmax(logits[ids], dim=-1)[0].item())
    return out


def test_local_choice_is_the_softmax_over_the_choice_tokens(tiny_model_dir):
    """Rows of 1 to ~40 completion tokens, right-padded in batches of 2: each row's score is the two-way softmax
    of its own unpadded forward."""
    j = build_judge(JudgeCfg(kind="hf", path=str(tiny_model_dir), batch_size=2), task=None, device=None, where="t",
                    run_dir=None)
    assert j.backend.model is None  # nothing loaded until the first call
    completions = ["24", "a much longer response with many more tokens than the others 1234567890", "5", "", "77"]
    problems = _problems(len(completions))
    scores = [v["score"] for v in _judge(j, completions, problems)]
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) == len(scores)
    texts = [j.template.format(prompt=p.prompt, completion=c, criterion=j.criteria[0].description, answer=p.answer)
             for p, c in zip(problems, completions)]
    assert scores == pytest.approx(_hand_choice(tiny_model_dir, texts), abs=1e-6)


def test_local_generate_parses_replies_and_a_malformed_one_is_unscorable(tiny_model_dir, monkeypatch):
    j = build_judge(JudgeCfg(kind="hf", path=str(tiny_model_dir), method="generate", max_new_tokens=4), task=None,
                    device=None, where="t", run_dir=None)
    replies = iter(["Yes.", "I think 7", "no"])
    monkeypatch.setattr(j.backend, "generate", lambda rows: [next(replies) for _ in rows])
    assert [None if v is None else v["score"] for v in _judge(j, ["x", "yy", "zzz"])] == [1.0, None, 0.0]


def test_local_generate_is_greedy_decoding_of_each_prompt(tiny_model_dir):
    from forkrl.models import load_model, load_tokenizer

    j = build_judge(JudgeCfg(kind="hf", path=str(tiny_model_dir), method="generate", max_new_tokens=5), task=None,
                    device=None, where="t", run_dir=None)
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    rows = [tok("12+34=").input_ids, tok("What is 5+5? A much longer prompt").input_ids]
    j.backend._tokenizer()
    got = j.backend.generate(rows)
    for row, reply in zip(rows, got):
        ids = model.generate(torch.tensor([row]), do_sample=False, max_new_tokens=5,
                             pad_token_id=tok.pad_token_id)[0, len(row):]
        assert reply == tok.decode(ids, skip_special_tokens=True)


def test_local_judge_errors_at_build(tmp_path, tiny_model_dir):
    with pytest.raises(RewardError, match=r"t.judge: judge path .* is not a directory"):
        build_judge(JudgeCfg(kind="hf", path=str(tmp_path / "nope")), task=None, device=None, where="t",
                    run_dir=None)
    with pytest.raises(RewardError, match="share a first token"):
        build_judge(JudgeCfg(kind="hf", path=str(tiny_model_dir), choices={"Yes": 1, "Yeah": 0}), task=None,
                    device=None, where="t", run_dir=None)
    with pytest.raises(RewardError, match="has no chat template"):
        build_judge(JudgeCfg(kind="hf", path=str(tiny_model_dir), chat=True), task=None, device=None, where="t",
                    run_dir=None)


# ---------------------------------------------------------------------------------------------------- end to end


def test_judge_components_reach_scored_through_the_reward_api(endpoint, tiny_model_dir, tmp_path):
    from forkrl.config import SamplingCfg
    from forkrl.models import load_model, load_tokenizer
    from forkrl.sampling import SamplingParams, make_sampler
    from forkrl.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(digits=2, train_size=20, heldout_size=5)
    problems = task.problems("train")[:2]
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    rollouts = make_sampler(SamplingCfg(), model, tok).sample([tok(p.prompt).input_ids for p in problems], 2,
                                                               SamplingParams(max_new_tokens=4))
    entry = RewardCfg(judge={"kind": "openai", "base_url": endpoint.url, "model": "judge-1", "api_key_env": "JUDGE_KEY",
                             "criteria": [{"name": "right", "description": "Right?", "weight": 1},
                                          {"name": "terse", "description": "Never wordy?", "weight": 1}]},
                      label="rubric", weight=2.0)
    rewards = load([entry], task, where="grpo.rewards", timeout_s=10.0, run_dir=tmp_path)
    assert (rewards[0].label, rewards[0].mode) == ("rubric", "batch")
    texts = ["good", "bad", "good MALFORMED", "good"]
    scored, failures = score_rollouts(rollouts, texts, problems, task, rewards, seeds=list(range(4)))
    nan = float("nan")
    assert torch.equal(scored.valid_N, torch.tensor([True, True, False, True]))
    assert torch.allclose(scored.components["rubric"], torch.tensor([0.5, 0.0, nan, 0.5]), equal_nan=True)
    assert torch.allclose(scored.components["rubric/right"], torch.tensor([1.0, 0.0, nan, 1.0]), equal_nan=True)
    assert torch.allclose(scored.components["rubric/terse"], torch.tensor([0.0, 0.0, nan, 0.0]), equal_nan=True)
    assert torch.allclose(scored.reward_N, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert failures.count == 1 and "returned None" in failures.first_message
