"""Python reward functions for the online RL stages (stages/grpo.py), named in a config as ``module:function``.

A reward function is called once per batch, as trl's GRPOTrainer calls its reward functions:

    fn(prompts, completions, **columns) -> list of floats, one per completion

``prompts``: each completion's prompt as chat messages (a list of {"role", "content"}); ``completions``: the
decoded replies (stop token left out); ``columns``: every other column of the dataset rows, one list per column
(e.g. ``answer=[...]``), so a function takes the ones it needs and ``**kwargs`` for the rest. A name that does not
import, a return that is not one finite number per completion: one RlhfError naming the function and what to do.

Built in (``rlhf.rewards:NAME``): ``demo_task`` (the demo task's checker, rlhf.demo_task.score: 1.0 for a right
answer in either layout) and ``demo_pref`` (rlhf.demo_task.preferred: 1.0 for the right number alone, the layout
the demo's preference pairs prefer).
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass

from rlhf.config import ConfigError


@dataclass
class RewardFunction:
    name: str  # as given: module:function
    fn: object

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> list[float]:
        """The function's rewards for one batch, checked: one finite float per completion."""
        columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
        out = self.fn(prompts, completions, **columns)
        out = out.tolist() if hasattr(out, "tolist") else out  # a tensor or an array
        try:
            if not isinstance(out, (list, tuple)) or any(isinstance(v, (str, bytes)) for v in out):
                raise TypeError
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ConfigError(f"reward function {self.name} returned {type(out).__name__} "
                              f"{_short(out)}; it must return a list of floats, one per completion") from None
        if len(values) != len(completions):
            raise ConfigError(f"reward function {self.name} returned {len(values)} rewards for {len(completions)} "
                              "completions; return one float per completion, in order")
        if bad := [v for v in values if not math.isfinite(v)]:
            raise ConfigError(f"reward function {self.name} returned {bad[0]}; rewards must be finite numbers")
        return values


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_reward_function(spec: str, key: str = "reward_funcs") -> RewardFunction:
    """``module:function`` -> the checked callable (it must take prompts and completions)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"key '{key}': {spec!r} is not module:function (e.g. rlhf.rewards:demo_task)")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"key '{key}': cannot import module {module!r} of {spec!r} ({e}); put it on PYTHONPATH or "
                          "fix the name") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        found = [n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")]
        from rlhf.errors import did_you_mean

        raise ConfigError(f"key '{key}': module {module} has no function {name!r}"
                          + did_you_mean(name, found, otherwise=""))
    try:
        inspect.signature(fn).bind_partial([], [])
    except TypeError:
        raise ConfigError(f"key '{key}': {spec} must take (prompts, completions, **columns); its signature is "
                          f"{inspect.signature(fn)}") from None
    except ValueError:  # no signature to read (a builtin): trust it
        pass
    return RewardFunction(spec, fn)


# ---------------------------------------------------------------------------------------------------------------
# Built-in reward functions


def demo_task(prompts, completions, answer, **columns) -> list[float]:
    """The demo task's checker (rlhf.demo_task.score) as a reward: 1.0 for a right answer, else 0.0."""
    from rlhf.demo_task import score

    return [score({"answer": a}, c) for a, c in zip(answer, completions)]


def demo_pref(prompts, completions, answer, **columns) -> list[float]:
    """rlhf.demo_task.preferred as a reward: 1.0 for the right answer in the preferred layout (the number alone)."""
    from rlhf.demo_task import preferred

    return [preferred({"answer": a}, c) for a, c in zip(answer, completions)]
