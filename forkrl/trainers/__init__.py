"""The trainers, one module per stage kind, each a thin loop over shared parts: ``accumulate`` (one optimizer
step's gradient over micro-batches), ``loop.StageLoop`` (optimizer, resume, guards, evaluation, metrics,
checkpoints), ``data`` (which examples a step takes). ``STAGES`` names the stage kinds a config's ``stages`` may
list; each entry imports its trainer when it runs."""


def _sft(ctx) -> dict:
    from .sft import train_sft

    return train_sft(ctx)


def _grpo(ctx) -> dict:
    from .grpo import train_grpo

    return train_grpo(ctx)


def _fork(ctx) -> dict:
    from .fork import train_fork

    return train_fork(ctx)


def _dpo(ctx) -> dict:
    from .dpo import train_dpo

    return train_dpo(ctx)


STAGES = {
    "sft": _sft,
    "grpo": _grpo,
    "fork": _fork,
    "dpo": _dpo,
}
