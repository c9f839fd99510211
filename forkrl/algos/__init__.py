"""RL math as pure tensor functions: advantages, per-token objectives, KL estimators, log-probs,
loss reductions and group filters. Each module ends with a plain dict registry and a ``get_*`` lookup."""
