"""A fake of exactly the vLLM 0.32.0 surface ``forkrl.sampling.vllm`` calls, faithful where forkrl's correctness
depends on it, for the CPU tests (vLLM cannot be installed here). ``modules()`` gives what the ``fake_vllm``
fixture puts in ``sys.modules`` as ``vllm``, ``vllm.lora`` and ``vllm.lora.request``.

It really generates. The engine holds its own copy of the model, loaded from the checkpoint it is built from and
changed only by what is pushed to it (``load_weights``; LoRA adapters read from a request's directory, cached by
int id as vLLM caches them), so a push that did not happen shows in its rows and log-probs. Each request draws from
its own ``torch.Generator`` seeded with the request's seed; the log-prob of a drawn token is vLLM's processed one,
log_softmax((logits / T) after top-k / top-p masking), at temperature 1 for greedy requests.

What vLLM would do silently wrong, or crash on a GPU, raises ``OrderError`` here: generating while any memory is
asleep (or after a level-2 sleep without a push), waking with nothing asleep (or a tag already resident), pushing
weights while they sleep, generating after ``load_weights`` without ``reset_prefix_cache``, an adapter int id
reused for another directory, an engine built without ``logprobs_mode="processed_logprobs"``. Arguments the real
calls do not take raise ``TypeError``. Every call is appended to ``LLM.calls`` as (name, details).
"""

from __future__ import annotations

import copy
import os
import random
import types
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

# the constructor arguments of vllm 0.32.0's LLM (and the EngineArgs it forwards) that forkrl might pass
ACCEPTED = {"model", "dtype", "seed", "gpu_memory_utilization", "enable_sleep_mode", "enable_prefix_caching",
            "distributed_executor_backend", "logprobs_mode", "skip_tokenizer_init", "max_model_len", "enable_lora",
            "max_lora_rank", "max_loras", "trust_remote_code", "tensor_parallel_size", "enforce_eager"}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TAGS = ("weights", "kv_cache")


class OrderError(RuntimeError):
    """forkrl called the engine in an order or state in which the real one misbehaves."""


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"


def truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's top-k then top-p masking: the tokens outside get -inf (the rest are renormalised by the softmax)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


class _Model:
    """What ``apply_model``'s function is given: the engine's model, whose ``load_weights`` takes HF names."""

    def __init__(self, llm: "LLM"):
        self.llm = llm

    def load_weights(self, weights) -> set[str]:
        llm = self.llm
        if "weights" in llm.asleep:
            raise OrderError("load_weights while the weights sleep (wake_up(tags=['weights']) first)")
        params, loaded, pushed = dict(llm.hf.named_parameters()), set(), {}
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"no parameter {name!r} in the engine's model")
            with torch.no_grad():
                params[name].copy_(tensor)
            pushed[name] = tensor.detach().clone()
            loaded.add(name)
        llm.pushes.append(pushed)
        llm.calls.append(("load_weights", sorted(loaded)))
        llm.needs_reset, llm.weights_lost = True, False
        return loaded


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        unknown = set(kwargs) - ACCEPTED
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("logprobs_mode") != "processed_logprobs":
            raise OrderError(f"logprobs_mode={kwargs.get('logprobs_mode')!r}: forkrl needs processed_logprobs (the "
                             "default returns temperature-1 log-probs, not the sampled distribution's)")
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])  # what ExecutorWithExternalLauncher reads
        if kwargs.get("enable_lora") and kwargs.get("max_lora_rank", 16) not in LORA_RANKS:
            raise ValueError(f"max_lora_rank {kwargs['max_lora_rank']} is not one of {LORA_RANKS}")
        self.kwargs, self.calls = kwargs, [("init", dict(kwargs, model=model))]
        dtype = {"auto": torch.float32}.get(kwargs.get("dtype", "auto"), getattr(torch, kwargs.get("dtype", "")))
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        eos = self.hf.generation_config.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.asleep: set[str] = set()
        self.needs_reset = self.weights_lost = False
        self.pushes: list[dict] = []  # each load_weights call's tensors, by name
        self.adapters: dict[int, dict] = {}  # each adapter id's tensors, as read from its directory
        self._lora_paths: dict[int, str] = {}
        self._lora_models: dict[int, torch.nn.Module] = {}
        seed = kwargs.get("seed", 0)  # vLLM without V1 multiprocessing seeds the process's generators
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ sleep mode
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))
        if not self.kwargs.get("enable_sleep_mode"):
            raise OrderError("sleep on an engine built without enable_sleep_mode")
        if self.asleep:
            raise OrderError("sleep while already asleep")
        if level not in (1, 2):
            raise OrderError(f"sleep level {level}: the fake has levels 1 and 2")
        self.asleep = set(TAGS)
        self.weights_lost = level == 2

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        if not self.asleep:
            raise OrderError("wake_up while awake")
        wake = set(TAGS if tags is None else tags)
        if tags is not None and not wake <= self.asleep:
            raise OrderError(f"wake_up({tags}): {sorted(wake - self.asleep)} already resident")
        self.asleep -= wake
        return not self.asleep

    # ------------------------------------------------------------------ weights
    def apply_model(self, func):
        self.calls.append(("apply_model", None))
        return [func(_Model(self))]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        if self.asleep:
            raise OrderError("reset_prefix_cache while asleep")
        self.needs_reset = False
        return True

    def _lora_model(self, request: LoRARequest):
        from peft import PeftModel

        if not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled on this engine (enable_lora=True)")
        rid = request.lora_int_id
        if rid in self._lora_paths and self._lora_paths[rid] != request.lora_path:
            raise OrderError(f"LoRA id {rid} reused for {request.lora_path}: vLLM would serve the adapter it cached "
                             f"from {self._lora_paths[rid]}")
        if rid not in self._lora_models:  # loaded once, then served from the cache
            self._lora_paths[rid] = request.lora_path
            self.adapters[rid] = load_file(os.path.join(request.lora_path, "adapter_model.safetensors"))
            # merged into the fake's own copy of the base, for speed (vLLM adds it unmerged; equal to float rounding)
            adapted = PeftModel.from_pretrained(copy.deepcopy(self.hf), request.lora_path)
            self._lora_models[rid] = adapted.merge_and_unload().eval()
        return self._lora_models[rid]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None) -> list[RequestOutput]:
        self.calls.append(("generate", {"rows": len(prompts), "lora": getattr(lora_request, "lora_int_id", None)}))
        if self.asleep:
            raise OrderError(f"generate while {sorted(self.asleep)} sleep")
        if self.weights_lost:
            raise OrderError("generate after a level-2 sleep with no push: the weights were discarded")
        if self.needs_reset:
            raise OrderError("generate after load_weights without reset_prefix_cache: cached blocks are stale")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        model = self.hf if lora_request is None else self._lora_model(lora_request)
        return [RequestOutput(str(i), None, list(p["prompt_token_ids"]), [self._one(p["prompt_token_ids"], sp, model)])
                for i, (p, sp) in enumerate(zip(prompts, params))]

    @torch.no_grad()
    def _one(self, prompt: list[int], sp: SamplingParams, model) -> CompletionOutput:
        if sp.n != 1:
            raise NotImplementedError("the fake draws n=1 per request")
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        greedy = sp.temperature < 1e-5
        stops = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else {self.eos})
        tokens, logprobs, finish = [], [], "length"
        for _ in range(sp.max_tokens):  # the whole sequence each step: no cache API to depend on, and tiny models
            out = model(input_ids=torch.tensor([list(prompt) + tokens]), use_cache=False)
            logits = out.logits[0, -1].float() / (1.0 if greedy else sp.temperature)
            logp = torch.log_softmax(logits if greedy else truncate(logits, sp.top_k, sp.top_p), -1)
            tok = int(logp.argmax()) if greedy else int(torch.multinomial(logp.exp(), 1, generator=gen))
            tokens.append(tok)
            logprobs.append({tok: Logprob(float(logp[tok]), rank=int((logp > logp[tok]).sum()) + 1)})
            if tok in stops:
                finish = "stop"
                break
        return CompletionOutput(0, "", tokens, sum(lp[t].logprob for lp, t in zip(logprobs, tokens)),
                                logprobs if sp.logprobs is not None else None, finish,
                                tokens[-1] if finish == "stop" and tokens[-1] != self.eos else None)


def modules() -> dict[str, types.ModuleType]:
    """``vllm``, ``vllm.lora`` and ``vllm.lora.request`` as this fake."""
    vllm, lora, request = (types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request"))
    vllm.LLM, vllm.SamplingParams, vllm.__version__ = LLM, SamplingParams, "0.32.0"
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request = lora, request
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}


__all__ = ["LLM", "LoRARequest", "OrderError", "SamplingParams", "modules"]
