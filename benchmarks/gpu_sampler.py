"""Which GPU sampler? Times one sampling call of the model's forward loop (``hf``), the static-cache backend
(``static``: compiled on CUDA, and ``static_eager`` beside it to split the cache's effect from the compiler's) and,
where this transformers has it, transformers' continuous batching (``cb``: ``generate_batch``, its manager kept
between calls as an RL loop would keep it), on one device and one model shape, after one warm-up call each (the
warm-up's time is reported too: compiling and graph capture are paid there), the timed calls alternating.

The model is built locally from a config with random weights (no download): ``--size 0.5b`` has Qwen2.5-0.5B's
shape (24 layers, hidden 896, 14 heads, 2 key/value heads, vocabulary 151,936), ``tiny`` a toy one for a smoke
run. Prompts are random token ids of uneven lengths; EOS is the vocabulary's last id, which random weights almost
never draw, so every row runs to ``--new-tokens`` and every backend does the same work. ``cb`` is not seeded per
row (it draws with ``torch.multinomial``), so its tokens are not ``hf``'s; for the others the table gives whether
their tokens equal ``hf``'s. For every backend it gives the largest gap between its sampler log-probs and the
trainer's forward (``forward.ModelForward``) at the sampling temperature, on its own rows.

    python benchmarks/gpu_sampler.py --device cuda --size 0.5b --rows 64 --new-tokens 256 --json gpu_sampler.json
    python benchmarks/gpu_sampler.py --device cpu --size tiny --backends hf static   # the smoke run (tests/)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
}
BACKENDS = ("hf", "static", "static_eager", "cb")


def build(size: str, device: str, dtype: torch.dtype):
    """(model, tokenizer stand-in): a Qwen2 of ``size`` with random weights, made on ``device``; the samplers read
    only the tokenizer's pad and EOS ids."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = SIZES[size]
    eos, pad = shape["vocab_size"] - 1, shape["vocab_size"] - 2
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=eos,
                         pad_token_id=pad, bos_token_id=eos, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    return model.eval(), SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def make_prompts(n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab - 2, (k,), generator=g).tolist() for k in lengths]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def trainer_gap(model, rollouts, temperature: float, rows: int = 4) -> float:
    """max |sampler log-prob − ModelForward's| over completion tokens, a few rows at a time (the logits are
    rows × L × V)."""
    from forkrl.forward import ModelForward

    worst = 0.0
    with torch.no_grad():
        for s in range(0, rollouts.num_rows, rows):
            idx = torch.arange(s, min(s + rows, rollouts.num_rows))
            logp_NT, _, mask_NT = ModelForward(model).logprobs(rollouts, idx, temperature=temperature)
            mine_NT = rollouts.select(idx).sampler_logp_NL[:, 1:]
            worst = max(worst, float((logp_NT.float().cpu() - mine_NT)[mask_NT.cpu()].abs().max()))
    return worst


def forkrl_call(sampler, prompts, group, params, seeds):
    def call():
        r = sampler.sample(prompts, group, params, seeds=seeds)
        return r, int(r.completion_mask_NL.sum())
    return call


def cb_call(model, prompts, group, params, num_blocks: int | None):
    """``generate_batch`` with the prompts' groups as forked children (continuous batching's prefix sharing).
    ``num_blocks``: its paged cache's size (None: sized from free device memory, as it does by default)."""
    import logging

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=True, temperature=params.temperature, top_k=0, top_p=1.0,
                           max_new_tokens=params.max_new_tokens, num_return_sequences=group,
                           eos_token_id=model.generation_config.eos_token_id,
                           pad_token_id=model.generation_config.pad_token_id)
    cb = ContinuousBatchingConfig(return_logprobs=True, num_blocks=num_blocks)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # a warning per call about persistence

    def call():
        out = list(model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                        persistent_manager=True).values())  # prompt-major, as forkrl's rows
        return cb_rollouts(out, group, model.generation_config), sum(len(o.generated_tokens) for o in out)
    return call


def cb_rollouts(outputs, group: int, gen):
    """continuous batching's outputs as forkrl ``Rollouts`` (through the decode loop's own ``assemble``), so that its
    log-probs can be checked against the trainer's like the other backends'."""
    from forkrl.sampling.decode import assemble

    width = max(len(o.generated_tokens) for o in outputs)
    new_BS = torch.full((len(outputs), width), gen.pad_token_id, dtype=torch.long)
    logp_BS = torch.zeros(len(outputs), width)
    for r, o in enumerate(outputs):
        new_BS[r, : len(o.generated_tokens)] = torch.tensor(o.generated_tokens)
        logp_BS[r, : len(o.logprobs)] = torch.tensor(o.logprobs)
    problem_N = torch.arange(len(outputs) // group).repeat_interleave(group)
    chunk = ([list(o.prompt_ids) for o in outputs], new_BS, logp_BS, gen.eos_token_id)
    return assemble([chunk], problem_N, pad_id=gen.pad_token_id)[0]


def has_cb(model) -> bool:
    return hasattr(model, "generate_batch")


def run(args) -> dict:
    from forkrl.sampling import SamplingParams
    from forkrl.sampling.hf import HFSampler
    from forkrl.sampling.static import StaticSampler

    dtype = {"auto": torch.bfloat16 if args.device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    model, tok = build(args.size, args.device, dtype)
    n_prompts = args.rows // args.group
    prompts = make_prompts(n_prompts, args.prompt_min, args.prompt_max, SIZES[args.size]["vocab_size"])
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens)
    seeds = list(range(n_prompts * args.group))
    calls = {}
    for name in args.backends:
        if name == "hf":
            calls[name] = forkrl_call(HFSampler(model, tok, batch_size=args.rows), prompts, args.group, params, seeds)
        elif name in ("static", "static_eager"):
            s = StaticSampler(model, tok, batch_size=args.rows, compile=None if name == "static" else False)
            calls[name] = forkrl_call(s, prompts, args.group, params, seeds)
        elif name == "cb" and has_cb(model):
            calls[name] = cb_call(model, prompts, args.group, params, args.cb_blocks)
        else:
            print(f"  (skipping {name}: this transformers has no generate_batch)")
    first, drawn, times, tokens = {}, {}, {name: [] for name in calls}, {}
    for name, call in calls.items():  # warm-up: compile, graph capture, cache allocation
        sync(args.device)
        t0 = time.perf_counter()
        drawn[name], _ = call()
        sync(args.device)
        first[name] = time.perf_counter() - t0
    for _ in range(args.repeats):  # alternating, so that a drift in the machine's load touches every backend
        for name, call in calls.items():
            t0 = time.perf_counter()
            _, tokens[name] = call()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    rows = [{"backend": name, "first_call_s": first[name], "seconds": statistics.median(times[name]),
             "tokens": tokens[name]} for name in calls]
    hf_s = next((r["seconds"] for r in rows if r["backend"] == "hf"), None)
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["over_hf"] = hf_s / r["seconds"] if hf_s else None  # > 1: faster than hf
        mine = drawn[r["backend"]]
        seeded = r["backend"] != "cb"  # cb draws with torch.multinomial: its rows are not hf's
        r["same_tokens_as_hf"] = (bool(torch.equal(mine.input_ids_NL, drawn["hf"].input_ids_NL))
                                  if seeded and "hf" in drawn else None)
        r["trainer_gap"] = trainer_gap(model, mine, args.temperature)
    import transformers

    return {"results": rows, "device": args.device, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
            "params": sum(p.numel() for p in model.parameters()), "rows": n_prompts * args.group,
            "group": args.group, "new_tokens": args.new_tokens, "prompt_len": [args.prompt_min, args.prompt_max],
            "temperature": args.temperature, "repeats": args.repeats, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "processor": platform.processor() or platform.machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=tuple(SIZES), default="0.5b")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: bf16 on cuda")
    ap.add_argument("--rows", type=int, default=64, help="completions per call (prompts × group)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per backend after its warm-up")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--cb-blocks", type=int, help="cb's cache blocks (default: sized from free memory; on a CPU that "
                    "is most of the RAM, a minute to allocate)")
    ap.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if args.rows < args.group or args.rows % args.group or args.repeats < 1 or args.temperature <= 0:
        sys.exit("--rows must be a positive multiple of --group, --repeats ≥ 1, --temperature > 0")
    if not 1 <= args.prompt_min <= args.prompt_max:
        sys.exit("need 1 ≤ --prompt-min ≤ --prompt-max")
    out = run(args)
    where = out["gpu"] or f"cpu, {out['threads']} threads"
    print(f"sampling backends, {out['size']} ({out['params'] / 1e6:.1f}M parameters, {out['dtype']}) on {where}; "
          f"{out['rows']} rows × {out['new_tokens']} new tokens, prompts {args.prompt_min}–{args.prompt_max} "
          f"tokens; "
          f"median of {args.repeats} alternating calls after a warm-up")
    print(f"  {'backend':<13} {'first s':>9} {'seconds':>9} {'tokens/s':>10} {'÷ hf':>6} {'same':>6} {'gap':>9}")
    for r in out["results"]:
        same = "-" if r["same_tokens_as_hf"] is None else str(r["same_tokens_as_hf"])
        gap = "-" if r["trainer_gap"] is None else f"{r['trainer_gap']:.2e}"
        ratio = "-" if r["over_hf"] is None else f"{r['over_hf']:.2f}"
        print(f"  {r['backend']:<13} {r['first_call_s']:>9.3f} {r['seconds']:>9.3f} {r['tokens_per_s']:>10.0f} "
              f"{ratio:>6} {same:>6} {gap:>9}")
    print("  ÷ hf: hf's seconds over the backend's (> 1: faster); same: tokens equal hf's (same seeds); gap: largest "
          "|sampler log-prob − trainer's| on the backend's own rows")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
