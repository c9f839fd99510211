"""Rewards of one's own, for examples/custom_rewards.yaml: each parameter is filled by name (see README, "Your own
rewards"); extra ones come from the entry's kwargs."""

from collections import Counter


def brevity(completion_ids, max_new_tokens, target=0.5):
    """0 at or under ``target`` of the token budget, falling to -1 at the budget."""
    used = len(completion_ids) / max_new_tokens
    return -max(0.0, used - target) / (1.0 - target)


def shows_work(completion):
    """A mapping: 'score' is the reward, the other keys are logged as reward/shows_work/<key>."""
    steps = completion.count("+") + completion.count(";")
    return {"score": float(steps > 0), "steps": float(steps), "chars": float(len(completion))}


def agrees_with_majority(completions, task):
    """mode: group — one call per problem's group: 1 for a completion whose answer is the group's most common."""
    from forkrl.tasks.arithmetic import extract_answer

    answers = [extract_answer(c) for c in completions]
    top, _ = Counter(a for a in answers if a is not None).most_common(1)[0] if any(answers) else (None, 0)
    return [float(a is not None and a == top) for a in answers]
