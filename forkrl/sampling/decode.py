"""The decode loop every engine-based sampler runs, and the per-row draws it makes.

``decode_chunk`` is the loop ``generate`` runs, written out over a *decode engine* (an object with ``prefill``,
``step`` and ``device``: ``hf.HFEngine``, the model's own forward, or ``cpu.engine.FastEngine``), so that sampling
and ``forkrl diff``'s lockstep decoding share it. Each row is drawn from its own seeded stream (``RowSampler``:
a counter-based uniform per (seed, step), ``uniform``), and its sampler log-probs, log_softmax(logits / T) at the
drawn token before top-k/top-p truncation, are recorded on the way: the tempered policy the trainer recomputes.
``EngineSampler`` turns the loop into a ``Sampler`` (with the entropy and lockstep capabilities); a backend
subclasses it with its engine.
"""

from __future__ import annotations

import torch

from ..algos.logprobs import entropy_from_logits
from ..types import Role, Rollouts
from .base import SamplingParams


class RowSampler:
    """Samples every row from its own seeded random stream, and records sampler log-probs.

    Called with (the previous step's tokens or None, this step's logits), it does temperature, top-k, top-p
    and the draw itself and returns the tokens (the argmax when greedy). Why: a row's sample
    depends only on its seed, not on which other rows share its batch or its rank, so rollouts are the same
    however a step is split across micro-batches, sampler chunks or processes, and a resumed run replays them.

    At step t it also gathers step t-1's tempered log-prob, log_softmax(logits / T), of the token drawn
    there (before truncation: what the trainer recomputes). One [rows, V] buffer is held at a time.
    """

    def __init__(self, params: SamplingParams, seeds: list[int], *, entropy: bool = False):
        self.params, self.entropy = params, entropy
        self.H: list[torch.Tensor] = []  # with ``entropy``: each step's entropy of softmax(logits), temperature 1
        self.temperature = params.temperature if not params.greedy else 1.0
        self.seeds_B = torch.tensor(seeds, dtype=torch.int64)
        self.step = 0
        self.u_BS: torch.Tensor | None = None  # every draw's uniform, made on the first draw (one call, not one a step)
        self.prev_logp_BV: torch.Tensor | None = None
        self.logp: list[torch.Tensor] = []

    def gather_last(self, token_B: torch.Tensor) -> None:
        if self.prev_logp_BV is not None:
            self.logp.append(self.prev_logp_BV.gather(1, token_B[:, None].to(self.prev_logp_BV.device)).squeeze(1))

    def __call__(self, prev_token_B: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if prev_token_B is not None:
            self.gather_last(prev_token_B)
        if self.entropy:
            self.H.append(entropy_from_logits(scores.float()).cpu())
        logits = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature  # x / 1 is x
        self.prev_logp_BV = torch.log_softmax(logits, dim=-1)
        if self.params.greedy:
            return scores.argmax(-1)
        probs = truncate(self.prev_logp_BV.exp(), self.params.top_k, self.params.top_p).double()
        self.step += 1
        if self.u_BS is None:
            steps = torch.arange(1, self.params.max_new_tokens + 1)
            self.u_BS = uniform(self.seeds_B[:, None], steps[None]).to(probs.device)
        u_B = self.u_BS[:, self.step - 1] if self.step <= self.u_BS.shape[1] else uniform(self.seeds_B, self.step)
        cdf = probs.cumsum(1)
        token = torch.searchsorted(cdf, (u_B * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[1] - 1)
        return token.squeeze(1)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform(seeds_B: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """A uniform [0, 1) float64 per row from (seed, step): SplitMix64 (Steele et al. 2014) on int64 tensors,
    whose multiplications wrap mod 2^64. Counter-based, so one vectorised call serves every row (and, with a tensor
    of steps broadcast against the seeds, every step)."""
    x = seeds_B + (step * _signed(_GOLDEN) if torch.is_tensor(step) else _signed(step * _GOLDEN % (1 << 64)))
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    x = x ^ _srl(x, 31)
    return _srl(x, 11).double() * 2.0**-53


def truncate(probs_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero all but the top-k tokens, then all but the smallest set with mass >= top_p (at least one)."""
    if top_k and top_k < probs_BV.shape[1]:
        kth = probs_BV.topk(top_k, dim=1).values[:, -1:]
        probs_BV = torch.where(probs_BV >= kth, probs_BV, torch.zeros_like(probs_BV))
    if top_p < 1.0:
        sorted_p, order = probs_BV.sort(dim=1, descending=True)
        mass_before = sorted_p.cumsum(1) - sorted_p
        keep_sorted = mass_before < top_p * sorted_p.sum(1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs_BV = torch.where(keep, probs_BV, torch.zeros_like(probs_BV))
    return probs_BV


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), left-padded: generation continues from the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        attn[r, width - len(p) :] = 1
    return ids, attn


def decode_chunk(engines, prompts: list[list[int]], seeds: list[int], params: SamplingParams, *, tokenizer,
                 rule=None, rows_B: torch.Tensor | None = None, entropy: bool = False):
    """The decode loop ``generate`` runs, written out, over one left-padded batch.

    ``engines[0]`` is the model sampled from: each step's token is drawn from its logits by ``RowSampler``.
    Any further engine is fed the same tokens, and ``rule(step, logits_0, logits_last, rows_B, seeds_B)``
    (``forkrl diff``'s substitutions) may return (where_B, token_B) to overwrite the draw at rows still
    generating. After a row's EOS it gets padding. Returns ((prompts, new_BS, logp_BS, eos_id), subs_B), and
    with ``entropy`` the chunk gains H_BS, each step's entropy of ``engines[0]``'s distribution (temperature 1)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, attn = left_pad(prompts, pad_id)
    device = engines[0].device
    ids, attn = ids.to(device), attn.to(device)
    draw = RowSampler(params, seeds, entropy=entropy)
    seeds_B = torch.tensor(seeds, dtype=torch.int64)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    subs_B = torch.zeros(len(prompts), dtype=torch.long)
    logits = [e.prefill(ids, attn, params.max_new_tokens) for e in engines]
    pos_B = attn.sum(-1) - 1  # the last prompt token's position (left padding: it is the last column)
    new, prev = [], None
    for step in range(params.max_new_tokens):
        token = draw(prev, logits[0])
        if rule is not None:
            sub, alt = rule(step, logits[0], logits[-1], rows_B, seeds_B)
            sub = sub.to(device) & ~finished
            token = torch.where(sub, alt.to(device), token)
            subs_B += sub.cpu().long()
        token = token.masked_fill(finished, pad_id)
        new.append(token)
        finished |= token == eos_id
        if step == params.max_new_tokens - 1 or bool(finished.all()):
            break
        prev, pos_B = token, pos_B + 1
        logits = [e.step(token, pos_B) for e in engines]
    new_BS = torch.stack(new, dim=1).cpu()
    draw.gather_last(new_BS[:, -1])
    logp = torch.stack(draw.logp, dim=1).cpu()
    chunk = (prompts, new_BS, logp, eos_id) + ((torch.stack(draw.H, dim=1),) if entropy else ())
    return chunk, subs_B


def assemble(chunks, problem_N: torch.Tensor, *, pad_id: int) -> tuple[Rollouts, torch.Tensor | None]:
    """Re-lay generated rows as ``[prompt | completion up to and including EOS | pad]``, right-padded; with
    the chunks' per-step entropies (``decode_chunk(entropy=True)``) also H_NL, laid out like the sampler
    log-probs (at each completion token's input position), else None."""
    rows = []
    for prompts, new, logp, eos_id, *H in chunks:
        for r, prompt in enumerate(prompts):
            is_eos = (new[r] == eos_id).nonzero()
            n = int(is_eos[0]) + 1 if len(is_eos) else new.shape[1]
            rows.append((prompt, new[r, :n].tolist(), logp[r, :n], H[0][r, :n] if H else None, not len(is_eos)))
    width = max(len(p) + len(c) for p, c, *_ in rows)
    N = len(rows)
    ids = torch.full((N, width), pad_id, dtype=torch.long)
    role = torch.full((N, width), int(Role.PAD), dtype=torch.int8)
    slogp = torch.zeros(N, width)
    H_NL = torch.zeros(N, width) if rows[0][3] is not None else None
    for r, (p, c, lp, h, _) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        role[r, : len(p)] = Role.PROMPT
        role[r, len(p) : len(p) + len(c)] = Role.COMPLETION
        slogp[r, len(p) : len(p) + len(c)] = lp
        if H_NL is not None:
            H_NL[r, len(p) : len(p) + len(c)] = h
    rollouts = Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=slogp, group_N=problem_N.clone(),
                        problem_N=problem_N, truncated_N=torch.tensor([t for *_, t in rows]))
    return rollouts, H_NL


class EngineSampler:
    """A ``Sampler`` over a decode engine, ``group_size`` completions per prompt in chunks of ``batch_size`` rows
    (one engine per chunk, built from the current weights). Subclasses give ``engine(model)``; this class gives
    ``sample``, ``sample_with_entropy`` and ``lockstep`` (see ``base``), all through ``decode_chunk`` with the same
    rows, seeds and chunks, so they agree token for token where no rule substitutes."""

    def __init__(self, model, tokenizer, *, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def engine(self, model):
        raise NotImplementedError

    def sync_weights(self) -> None:
        """Nothing to push: each sampling call's engines read the model's parameters."""

    def sample(self, prompt_ids: list[list[int]], group_size: int, params: SamplingParams, *,
               seeds: list[int] | None = None) -> Rollouts:
        """``seeds``: one per row (prompt-major); by default drawn from torch's global generator, so
        ``torch.manual_seed`` still fixes the result."""
        return self.decode(prompt_ids, group_size, params, seeds)[0]

    def sample_with_entropy(self, prompt_ids, group_size: int, params: SamplingParams, *, seeds=None):
        """(rollouts, H_NT): the sampled model's entropy (temperature 1) at each target position ``input_ids[:, 1:]``
        of the completions, 0 elsewhere, taken from the decode's own logits (no second teacher-forced pass)."""
        rollouts, H_NL, _ = self.decode(prompt_ids, group_size, params, seeds, entropy=True)
        return rollouts, H_NL[:, 1:]

    def lockstep(self, other, prompt_ids, group_size: int, params: SamplingParams, *, seeds, rule):
        """See ``base.LockstepSampler``: ``other`` gets an engine of this sampler's kind and the same tokens."""
        rollouts, _, subs_N = self.decode(prompt_ids, group_size, params, seeds, other=other, rule=rule)
        return rollouts, subs_N

    @torch.no_grad()
    def decode(self, prompt_ids, group_size: int, params: SamplingParams, seeds, *, other=None, rule=None,
               entropy: bool = False, engine=None, after_chunk=None):
        """(rollouts, H_NL or None, subs_N): every row of ``prompt_ids`` × ``group_size`` through ``decode_chunk``.
        ``engine(model)``: the engine of each of this call's models (default ``self.engine``); ``after_chunk(engine,
        prompts, chunk)``: called after each chunk's decode (a recording backend keeps the record there)."""
        rows = [(p, i) for i, p in enumerate(prompt_ids) for _ in range(group_size)]
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(rows),)).tolist()
        if len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows")
        models = [self.model] + ([other] if other is not None else [])
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            chunks, subs = [], []
            for s in range(0, len(rows), self.batch_size):
                engines = [(engine or self.engine)(m) for m in models]
                prompts = [p for p, _ in rows[s : s + self.batch_size]]
                chunk, sub_B = decode_chunk(engines, prompts, seeds[s : s + self.batch_size], params,
                                            tokenizer=self.tokenizer, rule=rule, entropy=entropy,
                                            rows_B=torch.arange(s, min(s + self.batch_size, len(rows))))
                chunks.append(chunk)
                subs.append(sub_B)
                if after_chunk is not None:
                    after_chunk(engines[0], prompts, chunk)
        finally:
            for m, was in zip(models, was_training):
                m.train(was)
        problem_N = torch.tensor([i for _, i in rows], dtype=torch.long)
        rollouts, H_NL = assemble(chunks, problem_N, pad_id=self.tokenizer.pad_token_id)
        return rollouts, H_NL, torch.cat(subs)
