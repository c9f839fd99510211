"""Thin training loops (SFT, GRPO) composing samplers, rewards and the pure math of ``forkrl.algos``."""
