"""The vLLM backend (``sampling.backend: vllm``; experimental until a GPU run has checked it): one engine colocated
in each trainer process, on the same GPU as the policy (the optional extra ``forkrl[vllm]``, GPU machines only).

Pinned: ``vllm==0.32.0``, the newest release whose wheel requires forkrl's ``torch==2.13.0`` (it also requires
``transformers>=5.16.1,<5.20``: ``constraints-vllm.txt``). vLLM's Python API drifts every minor release; these are
the calls this module relies on, as the 0.32.0 source has them (re-check each one before moving the pin):

* ``vllm.LLM(model, dtype=, seed=, gpu_memory_utilization=, enable_sleep_mode=, enable_prefix_caching=,
  distributed_executor_backend="external_launcher", logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
  max_model_len=, enable_lora=, max_lora_rank=, max_loras=)``, in ``build_engine`` alone. ``external_launcher``
  reads torchrun's RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and turns off V1 multiprocessing, so the engine
  and its model live in this process; it then seeds Python's, NumPy's and torch's global generators, which
  ``build_engine`` puts back.
* ``LLM.generate([{"prompt_token_ids": ids}, ...], [SamplingParams, ...], use_tqdm=False, lora_request=)``: one
  ``RequestOutput`` per prompt, in order; ``.outputs[0].token_ids`` (the stop token included: checked per row),
  ``.outputs[0].logprobs`` (per position a dict token id -> ``Logprob``, ``.logprob``) and ``.finish_reason``
  ("stop" or "length").
* ``vllm.SamplingParams(n=1, temperature=, top_p=, top_k=, max_tokens=, logprobs=0, seed=, detokenize=False,
  ignore_eos=True, stop_token_ids=[eos])``: ``logprobs=0`` returns the drawn token's alone; ``ignore_eos`` with the
  tokenizer's EOS as the only stop token stops a row where forkrl's other backends stop it (not at the extra EOS
  ids of a generation config); ``seed`` gives each request its own generator.
* ``LLM.sleep(level=1)``, ``LLM.wake_up(tags=["weights"])``, ``LLM.wake_up()`` (an already resident tag is
  skipped), ``LLM.reset_prefix_cache()``.
* ``LLM.apply_model(fn)``: ``fn(model)`` in process, and that model's ``load_weights(iterable of (Hugging Face
  name, tensor))``.
* ``vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)``: vLLM caches an adapter by its int id.

How it runs. ``sync_weights`` (after every optimizer step) only marks the weights stale; the next ``sample`` wakes
the engine's weights, pushes (the full model's named parameters through ``load_weights``, each gathered whole with
``full_tensor()`` should a sharded policy be given; under peft LoRA the adapter alone, saved to a fresh directory and sent as
a ``LoRARequest`` with a new id, never merged into the trained weights), wakes the KV cache, resets the prefix
cache, generates one request per row with the row's seed, and puts the engine back to sleep. The first sample
pushes too: the engine was built from a checkpoint on disk, which need not hold the policy's weights (an engine an
earlier stage built, a checkpoint a resume replaced), and one push costs less than a step. Every sampler of the
process (the rollouts', the held-out evaluation's) shares its one engine.

Departures from the other backends: rows are drawn by vLLM's own per-request generators, so they are not the
``hf`` or ``fused`` backends' draws for the same seeds (each row still depends on its seed and the weights alone);
and under top-p / top-k the returned log-probs are those of the truncated distribution, so ``config`` refuses
truncation for the stages that train on rollouts. Not supported: ``trust_remote_code`` models; a peft model on an
engine built for another base. (Under ``distributed.strategy: fsdp2`` the samplers are given the full copy of the
weights every rank keeps, ``forkrl.sharding``, so held-out evaluation on rank 0 alone gathers nothing.)
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from ..types import Rollouts
from .base import SamplerError, SamplingParams
from .decode import assemble

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32.0 accepts
_ENGINE: "Colocated | None" = None  # this process's engine, built by the first vLLM sampler


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise SamplerError(f"'vllm' needs vLLM, which does not import here ({e}). On a GPU machine run pip install "
                           "'forkrl[vllm]' -c constraints-vllm.txt (never on a CPU install), or use sampling.backend: hf") from None
    return vllm


def _peft_base(model):
    """The Hugging Face model under a peft model, or None for a plain one."""
    return model.get_base_model() if hasattr(model, "peft_config") else None


def _checkpoint(model) -> str:
    """Where the model (a peft model's base) was loaded from: what vLLM builds its engine from."""
    base = _peft_base(model)
    path = str(getattr(model if base is None else base, "name_or_path", "") or "")
    if not path:
        raise SamplerError("vLLM builds its engine from a checkpoint on disk, and this model has none "
                           "(no name_or_path); save it with save_pretrained and load it from there")
    return path


def lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``r``."""
    fits = [k for k in LORA_RANKS if k >= r]
    if not fits:
        raise SamplerError(f"a LoRA rank of {r} is over vLLM's largest, {LORA_RANKS[-1]}; lower model.lora.r")
    return fits[0]


def engine_args(cfg, model) -> dict:
    """The ``vllm.LLM`` arguments for ``model`` (``cfg``: ``sampling.vllm``), built from its checkpoint on disk."""
    args = dict(model=_checkpoint(model), dtype=str(next(model.parameters()).dtype).removeprefix("torch."), seed=0,
                gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep_level > 0,
                enable_prefix_caching=cfg.enable_prefix_caching, distributed_executor_backend="external_launcher",
                logprobs_mode="processed_logprobs", skip_tokenizer_init=True)
    if cfg.max_model_len is not None:
        args["max_model_len"] = cfg.max_model_len
    if _peft_base(model) is not None:
        lora = model.peft_config[model.active_adapter]
        r = max([lora.r, *(getattr(lora, "rank_pattern", None) or {}).values()])
        args.update(enable_lora=True, max_lora_rank=lora_rank(r), max_loras=1)
    return args


def expandable_segments(env=os.environ) -> str | None:
    """The allocator variable that turns on ``expandable_segments``, or None. Its segments cannot be unmapped and
    remapped as sleep mode does (pytorch/pytorch#147851)."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        for item in env.get(var, "").split(","):
            key, _, value = item.partition(":")
            if key.strip() == "expandable_segments" and value.strip().lower() == "true":
                return var
    return None


def _launcher_env() -> None:
    """``external_launcher`` reads torchrun's variables; a process started without torchrun is a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@contextmanager
def _kept_rng():
    """vLLM seeds the global generators when it runs in process; the trainer's streams go on as they were."""
    import numpy as np

    cuda = torch.cuda.is_available()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda and torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda:
            torch.cuda.set_rng_state_all(states[3])


def build_engine(cfg, model):
    """This process's engine for ``model``. The one call that needs a GPU and the real vLLM is ``vllm.LLM(...)``;
    the tests run everything else against ``tests/fake_vllm.py``."""
    var = expandable_segments()
    if cfg.sleep_level and var:
        from ..config import ConfigError

        raise ConfigError(f"sampling.vllm.sleep_level: sleep mode cannot run with expandable_segments:True in {var} "
                          f"(vLLM's sleep unmaps and remaps memory that expandable segments keep); remove it from {var}, "
                          "or set sampling.vllm.sleep_level: 0")
    args = engine_args(cfg, model)
    vllm = _vllm()
    _launcher_env()
    with _kept_rng():
        return vllm.LLM(**args)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (a DTensor) is gathered, a collective every rank joins in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def named_weights(model):
    """(Hugging Face name, whole tensor) of each parameter, one at a time (one gathered tensor alive at once)."""
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        yield name, _full(p.detach())


def adapters_active(model) -> bool:
    """Whether a peft model computes with its adapter (not inside ``disable_adapter()``, the fork stage's base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in model.modules())


def save_adapter(model, out: Path) -> Path:
    """The active adapter's weights, whole, as peft writes them (``adapter_model.safetensors`` and its config)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    name = model.active_adapter
    state = get_peft_model_state_dict(model, adapter_name=name)
    save_file({k: _full(v.detach()).cpu().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    model.peft_config[name].save_pretrained(str(out))
    return out


class Colocated:
    """An engine and what it holds: whose weights (a weak reference to the model last pushed, and whether they
    changed since), the adapter request of a peft model, and whether it sleeps. Every vLLM call is made here."""

    def __init__(self, engine, *, sleep_level: int, lora: bool, base: str):
        self.engine, self.sleep_level, self.lora, self.base = engine, sleep_level, lora, base
        self.current, self.stale, self.base_intact = None, True, True
        self.adapter, self.lora_ids, self.adapter_dirs = None, 0, []
        self.tmp = tempfile.TemporaryDirectory(prefix="forkrl-vllm-")
        self.asleep = False
        self.sleep()  # the trainer has the GPU until the first sample

    def holds(self, model) -> bool:
        return self.current is not None and self.current() is model

    def mark_stale(self, model) -> None:
        if self.holds(model):
            self.stale = True

    def sleep(self) -> None:
        if self.sleep_level:
            self.engine.sleep(level=self.sleep_level)
            self.asleep = True

    def generate(self, model, prompts: list[list[int]], params: list) -> list:
        push = self.stale or not self.holds(model)
        if push and self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.engine.wake_up(tags=["weights"])  # the KV cache stays unmapped while whole tensors are gathered
        if push:
            self.push(model)
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False
        if push:
            self.engine.reset_prefix_cache()  # cached blocks were computed with the old weights
        request = self.adapter if _peft_base(model) is not None and adapters_active(model) else None
        outputs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                       lora_request=request)
        for old in self.adapter_dirs[:-1]:  # the engine has loaded the newest; the older ones are done with
            shutil.rmtree(old, ignore_errors=True)
        self.adapter_dirs = self.adapter_dirs[-1:]
        self.sleep()
        return outputs

    @torch.no_grad()
    def push(self, model) -> None:
        if _peft_base(model) is None:
            self.engine.apply_model(lambda m: m.load_weights(named_weights(model)))
            self.base_intact = False
        else:
            from vllm.lora.request import LoRARequest

            self.lora_ids += 1  # a new id each push: vLLM serves an id it knows from its cache, not from disk
            out = Path(self.tmp.name) / f"adapter-{self.lora_ids}"
            out.mkdir()
            self.adapter_dirs.append(save_adapter(model, out))
            self.adapter = LoRARequest(f"policy-{self.lora_ids}", self.lora_ids, str(out))
        self.current, self.stale = weakref.ref(model), False


def shared_engine(cfg, model) -> Colocated:
    """The process's one engine, built for the first model that asks; a later model shares it, its weights pushed
    in full, except a peft model that needs an engine built with LoRA from its own, untouched base."""
    global _ENGINE
    lora, path = _peft_base(model) is not None, _checkpoint(model)
    if _ENGINE is None:
        _ENGINE = Colocated(build_engine(cfg, model), sleep_level=cfg.sleep_level, lora=lora, base=path)
    elif lora and not (_ENGINE.lora and _ENGINE.base == path and _ENGINE.base_intact):
        raise SamplerError(f"this process's vLLM engine was built for {_ENGINE.base} "
                           f"({'with' if _ENGINE.lora else 'without'} LoRA) and has served other weights since; a LoRA "
                           f"policy on {path} needs its own engine, and vLLM runs one per process. Train these stages "
                           "in separate runs, or use sampling.backend: hf")
    return _ENGINE


def request_params(params: SamplingParams, seed: int, eos_id: int):
    return _vllm().SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  max_tokens=params.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
                                  ignore_eos=True, stop_token_ids=[eos_id])


def to_rollouts(prompts: list[list[int]], outputs, problem_N: torch.Tensor, *, eos_id: int, pad_id: int) -> Rollouts:
    """The engine's outputs laid out as every backend's (``decode.assemble``, each row its own chunk, so a row is
    cut exactly where the engine stopped it), with each drawn token's log-prob at its position."""
    chunks = []
    for r, (prompt, out) in enumerate(zip(prompts, outputs)):
        c = out.outputs[0]
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned no log-prob for some tokens of row {r}: was the engine built with "
                               "logprobs_mode='processed_logprobs' and the request made with logprobs=0?")
        if (bool(ids) and ids[-1] == eos_id) != (c.finish_reason == "stop"):
            raise RuntimeError(f"vLLM finished row {r} with {c.finish_reason!r} on token {ids[-1:]}; forkrl stops a "
                               f"row at EOS ({eos_id}) alone. Has SamplingParams' stop handling changed?")
        logp = [pos[t].logprob for pos, t in zip(c.logprobs, ids)]
        chunks.append(([prompt], torch.tensor([ids], dtype=torch.long), torch.tensor([logp], dtype=torch.float32),
                       eos_id))
    return assemble(chunks, problem_N, pad_id=pad_id)[0]


class VllmSampler:
    """A ``Sampler`` over the process's vLLM engine (``sampling.backend: vllm``)."""

    def __init__(self, model, tokenizer, engine: Colocated):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine

    def sync_weights(self) -> None:
        """The weights changed: the next ``sample`` pushes them (nothing is sent now)."""
        self.engine.mark_stale(self.model)

    def sample(self, prompt_ids: list[list[int]], group_size: int, params: SamplingParams, *,
               seeds: list[int] | None = None) -> Rollouts:
        rows = [(p, i) for i, p in enumerate(prompt_ids) for _ in range(group_size)]
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(rows),)).tolist()
        if len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows")
        eos = self.tokenizer.eos_token_id
        prompts = [p for p, _ in rows]
        outputs = self.engine.generate(self.model, prompts, [request_params(params, s, eos) for s in seeds])
        problem_N = torch.tensor([i for _, i in rows], dtype=torch.long)
        return to_rollouts(prompts, outputs, problem_N, eos_id=eos, pad_id=self.tokenizer.pad_token_id)


def make_vllm_sampler(cfg, model, tokenizer) -> VllmSampler:
    """``sampling.backend: vllm`` (``cfg``: the ``sampling`` section)."""
    _vllm()
    return VllmSampler(model, tokenizer, shared_engine(cfg.vllm, model))
