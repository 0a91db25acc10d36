"""``hooks(target, {name: fn})``: edit hooks on the model's or the engine's named points, in a ``with`` block.

    with sl.hooks(model, {"blocks.3.hook_resid_pre": lambda x, name: x * 0.5}):
        logits = model(ids).logits

``fn(tensor, name)`` returns a replacement of the same shape, or None to leave the tensor. The names are the table
:data:`smallthinker_lab.model.hooks.HOOK_POINTS` (``hook_points_table()``); a key may be a name, a pattern with
``*`` and ``?`` (fnmatch: ``"blocks.*.hook_resid_post"``), a list / tuple / set of those, or a callable(name) ->
bool. The hooks are removed when the block ends, also when it raises; ``record()`` keeps working alongside and sees
the edited values. On an engine, registered hooks make decode steps run eager (``Engine.explain()`` says so).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping

from ..model.hooks import check_hook_name, hook_names


def _target(target):
    if not hasattr(target, "hooks") or not hasattr(target, "config"):
        raise TypeError(f"hooks() needs a model or an engine (with .hooks and .config), got {type(target).__name__}")
    if getattr(target, "closed", False):
        raise RuntimeError("the engine is closed: call engine.reopen() before adding hooks")
    return target


def resolve_names(key, config) -> list[str]:
    """The edit points a name filter selects (see the module docstring), in the table's order; a filter that
    selects none raises ValueError naming it."""
    if callable(key) and not isinstance(key, str):
        names = [n for n in hook_names(config) if key(n)]
        if not names:
            raise ValueError(f"the filter {key!r} selects no hook point")
        return names
    if isinstance(key, str):
        if any(c in key for c in "*?["):
            names = [n for n in hook_names(config) if fnmatch.fnmatchcase(n, key)]
            if not names:
                raise ValueError(f"the pattern {key!r} matches no hook point (hook_points_table() lists them)")
            return names
        check_hook_name(key, config)
        return [key]
    if isinstance(key, Iterable):
        out = []
        for k in key:
            if not isinstance(k, str):
                raise TypeError(f"a list of hook points holds names, got {k!r}")
            out += resolve_names(k, config)
        return list(dict.fromkeys(out))
    raise TypeError(f"a hook filter is a name, a pattern, a list of them or a callable, got {key!r}")


def _pairs(spec) -> list[tuple[object, Callable]]:
    items = spec.items() if isinstance(spec, Mapping) else spec
    pairs = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("hooks() takes a dict {filter: fn} or a list of (filter, fn) pairs")
        key, fn = item
        if not callable(fn):
            raise TypeError(f"the hook for {key!r} is not callable: {fn!r}")
        pairs.append((key, fn))
    return pairs


class hooks:  # noqa: N801  (a function-like context manager, as record())
    """Register edit hooks on ``target`` (a SmallThinkerForCausalLM or an Engine) for the ``with`` block.

    ``spec``: {filter: fn} or [(filter, fn), ...]; several hooks on one point run in the order given, each on the
    previous one's result. Every filter is resolved and checked before any hook is added.
    """

    def __init__(self, target, spec) -> None:
        self.target = _target(target)
        cfg = target.config
        self._plan = [(name, fn) for key, fn in _pairs(spec) for name in resolve_names(key, cfg)]
        self._handles: list = []

    @property
    def names(self) -> list[str]:
        """The hook points this block edits."""
        return list(dict.fromkeys(n for n, _ in self._plan))

    def __enter__(self) -> hooks:
        if self._handles:
            raise RuntimeError("this hooks() block is already active")
        registry = self.target.hooks
        try:
            for name, fn in self._plan:
                self._handles.append(registry.add(name, fn))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False
