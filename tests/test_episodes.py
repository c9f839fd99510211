"""Episodes token in, token out: codec round trips (plain and a real chat template), the sampler's log-probs equal
the model's on the assembled rows, an episode is the same whatever batch it was played in, a raising environment
makes its episode unscorable."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl import models
from forkrl.envs import FrozenLake
from forkrl.envs.episodes import ChatCodec, CodecError, PlainCodec, episode_rollouts, run_episodes
from forkrl.envs.grid import mixed_demos
from forkrl.sampling import SamplingParams
from forkrl.sampling.hf import HFSampler
from forkrl.types import Role

INSTRUCTION = "Reach G, avoid O. Actions: Left Down Right Up."


def env_texts():
    demos = mixed_demos(FrozenLake, range(60), {"optimal": 1, "wander": 1}, max_turns=6, actions_per_turn=1)
    texts = []
    for d in demos:
        env = FrozenLake()
        obs = [env.reset(d.seed)] + [env.step(t).observation for t in d.turns]
        texts.append(INSTRUCTION + "\n" + "\n".join(o + "\n" + t for o, t in zip(obs, d.turns)))
    return texts


@pytest.fixture(scope="module")
def env_model(tmp_path_factory):
    out = models.build_tiny(tmp_path_factory.mktemp("envtiny") / "m", env_texts(), arch="qwen2", vocab_size=320,
                            seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_positions=512)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def runs(roles):
    """(role, start, end) of each run of equal roles."""
    out, start = [], 0
    for i in range(1, len(roles) + 1):
        if i == len(roles) or roles[i] != roles[start]:
            out.append((roles[start], start, i))
            start = i
    return out


PARAMS = SamplingParams(temperature=1.0, max_new_tokens=12)


def play(model, tok, seeds, group, row_seeds, **kw):
    return run_episodes(HFSampler(model, tok), PlainCodec(tok), FrozenLake, INSTRUCTION, seeds, group, PARAMS,
                        seeds=row_seeds, max_turns=kw.get("max_turns", 4), max_tokens=kw.get("max_tokens", 512))


def test_plain_round_trip_and_sampler_logprobs_match_the_model(env_model):
    model, tok = env_model
    episodes = play(model, tok, [0, 1, 2], 2, list(range(100, 106)))
    for e in episodes:
        spans = runs(e.roles)
        assert spans[0][0] == Role.PROMPT
        acts = [tok.decode(e.ids[a:b], skip_special_tokens=True) for r, a, b in spans if r == Role.COMPLETION]
        envs = [tok.decode(e.ids[a:b]) for r, a, b in spans if r == Role.ENV]
        assert acts == [t.action for t in e.turns]
        assert envs == [t.observation for t in e.turns][: len(envs)] and len(envs) >= len(e.turns) - 1
        assert all(e.logp[i] == 0.0 for i, r in enumerate(e.roles) if r != Role.COMPLETION)
        for r, a, b in spans[:-1]:  # every action that ended on EOS is followed by the bridge's newline
            if r == Role.COMPLETION and e.ids[b - 1] == tok.eos_token_id:
                assert tok.decode(e.ids[b:b + 1]) == "\n"
    batch = episode_rollouts(episodes, pad_id=tok.pad_token_id, group_size=2)
    assert batch.group_N.tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_NL, attention_mask=batch.attention_mask_NL).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, batch.input_ids_NL[:, 1:, None]).squeeze(2)
    m = batch.completion_mask_NL[:, 1:]
    # the trainer's teacher-forced log-probs on the assembled rows are the sampler's: no token was re-encoded
    assert (logp - batch.sampler_logp_NL[:, 1:]).abs()[m].max() < 1e-4


def test_an_episode_does_not_depend_on_its_batch(env_model):
    model, tok = env_model
    together = play(model, tok, [5, 6, 7], 2, [11, 12, 13, 14, 15, 16])
    alone = play(model, tok, [6], 2, [13, 14])
    assert [e.ids for e in together[2:4]] == [e.ids for e in alone]
    assert [e.ret for e in together[2:4]] == [e.ret for e in alone]


def test_token_budget_ends_an_episode_marked_truncated(env_model):
    model, tok = env_model
    (e,) = play(model, tok, [3], 1, [9], max_turns=10, max_tokens=60)
    assert len(e.ids) <= 60 and e.truncated and e.done


class Scripted:
    """A sampler that writes fixed actions (the ids a codec would give them), for codec tests without a model."""

    def __init__(self, tokenizer, codec, text="go <answer>Right</answer>"):
        self.tokenizer, self.ids = tokenizer, codec.action(text)

    def sample(self, prompt_ids, group_size, params, *, seeds):
        from forkrl.sampling.decode import assemble

        new = torch.tensor([self.ids] * len(prompt_ids))
        chunk = (prompt_ids, new, torch.full(new.shape, -0.5), self.tokenizer.eos_token_id)
        return assemble([chunk], torch.arange(len(prompt_ids)), pad_id=self.tokenizer.pad_token_id)[0]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture()
def chat_tok(env_model):
    tok = AutoTokenizer.from_pretrained(env_model[1].name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    return tok


def test_chat_template_round_trip_keeps_the_newline_after_end_of_turn(chat_tok):
    codec = ChatCodec(chat_tok, system="You play FrozenLake.")
    (e,) = run_episodes(Scripted(chat_tok, codec), codec, FrozenLake, INSTRUCTION, [0], 1, PARAMS, seeds=[1],
                        max_turns=3, max_tokens=2000)
    spans = runs(e.roles)
    envs = [chat_tok.decode(e.ids[a:b]) for r, a, b in spans if r == Role.ENV]
    assert envs == [t.observation for t in e.turns]
    text = chat_tok.decode(e.ids)
    # what the template itself renders for the same conversation, token for token
    convo = [{"role": "system", "content": "You play FrozenLake."},
             {"role": "user", "content": INSTRUCTION + "\n" + FrozenLake().reset(0)}]
    for t in e.turns:
        convo += [{"role": "assistant", "content": t.action}, {"role": "user", "content": t.observation}]
    assert text == chat_tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=False).rstrip("\n") + "\n"
    assert "<|im_end|>\n<|im_start|>user\n" in text
    for r, a, b in spans:
        if r == Role.COMPLETION:
            assert e.ids[b - 1] == chat_tok.eos_token_id and chat_tok.decode(e.ids[b:b + 1]) == "\n"


def test_a_template_that_rewrites_history_is_refused(chat_tok):
    chat_tok.chat_template = ("{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                              "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                              "{% endif %}")
    with pytest.raises(CodecError, match="does not preserve prefixes"):
        ChatCodec(chat_tok)
    chat_tok.chat_template = None
    with pytest.raises(CodecError, match="no chat template"):
        ChatCodec(chat_tok)


def test_a_raising_environment_makes_its_episode_unscorable(env_model):
    _, tok = env_model

    class Flaky(FrozenLake):
        def step(self, action):
            if self.start == (0, 0) or self.actions_taken >= 1:
                raise RuntimeError("simulator crashed")
            return super().step(action)

    codec = PlainCodec(tok)
    episodes = run_episodes(Scripted(tok, codec), codec, Flaky, INSTRUCTION, list(range(8)), 1, PARAMS,
                            seeds=list(range(8)), max_turns=3, max_tokens=512)
    errors = [e.error for e in episodes]
    assert any(errors) and all("simulator crashed" in m for m in errors if m)
    assert all(e.done for e in episodes)
