"""RL math as pure tensor functions: advantages, per-token objectives, KL estimators, log-probs,
loss reductions and group filters. Each module ends with a plain dict registry and a ``get_*`` lookup."""


def lookup(registry: dict, name: str, what: str):
    """``registry[name]``; a ValueError naming ``what`` and listing the valid names otherwise."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[name]
