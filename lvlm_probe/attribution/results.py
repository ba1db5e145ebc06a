"""What every attribution result holds, and the one calling convention of attribution functions.

Every function that scores a target is called ``f(model, batch, target, *, foil=None, ...)`` and
returns an :class:`AttributionResult`: besides its own scores, the scored target and foil of each
example (decoded strings and token ids), the examples' token layouts (hence their prompts, tokens
and image grids) and the method's name; ``to_frame()`` gives a tidy DataFrame (one row per
measurement) and ``plot()`` a matplotlib Figure whose title names the question, the target (and
foil) and the method (it never calls ``plt.show``). Printed (``repr`` and ``str``), a result is
one short line in the library's one format (:func:`summary_repr`): the class, the method, the
examples, the target and foil, then its key numbers, e.g. ``SourceSplit(method='source_split',
2 examples, target 'yes' vs foil 'no'; ...; mean shares prior 0.10 prompt 0.20 image 0.70)``;
never a tensor, the tokenizer or a whole table.

Results whose measurements are one table (:func:`~lvlm_probe.attribution.knockout`,
:func:`~lvlm_probe.attribution.deletion_insertion`,
:func:`~lvlm_probe.attribution.randomization_check`) are :class:`AttributionTable` s: ``to_frame()``
is that table, and for one release DataFrame methods called on the result itself still reach it,
with a ``DeprecationWarning``.
"""
from __future__ import annotations

import functools
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..layout import TokenLayout

# --- the result base -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AttributionResult:
    """The base of every attribution result: what was scored, on which inputs, by which method.

    Attributes:
        method: the method's name (e.g. ``"source_split"``, ``"ig"``, ``"knockout"``).
        targets: the scored target token of each example, decoded (None: nothing was scored).
        foils: the foil token of each example, decoded (None: no foil, the target alone).
        target_ids, foil_ids: ``[batch]`` their token ids (None where the strings are).
        layouts: the examples' token layouts; :attr:`prompts`, :attr:`input_tokens` and
            :attr:`image_grids` read from them.
    """

    method: str = ""
    targets: list[str] | None = None
    foils: list[str] | None = None
    target_ids: Tensor | None = field(default=None, repr=False)
    foil_ids: Tensor | None = field(default=None, repr=False)
    layouts: list[TokenLayout] = field(default_factory=list, repr=False)

    # -- what the inputs were ---------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """The user prompt (the question) of each example."""
        return [layout.prompt for layout in self.layouts]

    @property
    def input_tokens(self) -> list[list[str]]:
        """The token strings of each example's sequence (padding included)."""
        return [list(layout.tokens) for layout in self.layouts]

    @property
    def image_grids(self) -> list[list[tuple[int, int]]]:
        """``(rows, cols)`` of each example's image grids, in image order (``(0, 0)``: none)."""
        return [layout.image_grids for layout in self.layouts]

    # -- the two views every result has -------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """A tidy DataFrame of the result: one row per measurement."""
        raise NotImplementedError(f"{type(self).__name__} does not define to_frame()")

    def plot(self, *args: Any, **kwargs: Any) -> Figure:
        """A Figure of the result (never shown: display or save it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define plot()")

    # -- how it prints ----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        """A short summary: the class, the method, the examples and the scored answers, then the
        result's key numbers (:meth:`_summary`); never a tensor or the tokenizer, so ``print``
        and a notebook cell stay readable. Dataclass subclasses keep it only with ``repr=False``
        (or a ``__repr__`` of their own), which the summary test checks for every result type."""
        return summary_repr(type(self).__name__, self._summary_head(), *([part] for part in self._summary()))

    def __str__(self) -> str:
        return repr(self)

    def _summary_head(self) -> list[str]:
        """``method='...'``, the number of examples and the scored target (and foil)."""
        head = [f"method={self.method!r}", count(self.n_examples, "example")]
        if self.targets is not None:
            answer = _one_or_many("target", "targets", [t.strip() for t in self.targets], sep=" ")
            if self.foils is not None:
                answer += " vs " + _one_or_many("foil", "foils", [f.strip() for f in self.foils], sep=" ")
            head.append(answer)
        return head

    def _summary(self) -> list[str]:
        """The result's key numbers, each a short phrase printed after a semicolon (subclasses
        add theirs)."""
        return []

    @property
    def n_examples(self) -> int:
        """How many examples the result covers."""
        return len(self.targets) if self.targets is not None else len(self.layouts)

    # -- helpers for subclasses -----------------------------------------------------------------------
    def answers(self) -> pd.DataFrame:
        """One row per example: ``example``, ``prompt``, ``target``, ``foil`` (None without)."""
        n = len(self.targets) if self.targets is not None else len(self.layouts)
        prompts = self.prompts if len(self.layouts) == n else [None] * n
        return pd.DataFrame({"example": range(n), "prompt": prompts,
                             "target": self.targets if self.targets is not None else [None] * n,
                             "foil": self.foils if self.foils is not None else [None] * n})

    def title(self, examples: int | Sequence[int] | None = None, method: str | None = None,
              width: int = 100) -> str:
        """A figure title naming the question, the target (and foil) and the method.

        Args:
            examples: the example shown (an index), the examples shown (indices), or None for all.
            method: the method's description (default :attr:`method`).
            width: wrap the title at this many characters.
        """
        n = len(self.targets) if self.targets is not None else len(self.layouts)
        if examples is None:
            chosen = list(range(n))
        elif isinstance(examples, int):
            chosen = [range(n)[examples]]
        else:
            chosen = list(examples)
        parts = [method or self.method]
        prompts = [self.prompts[i] for i in chosen] if self.layouts else []
        if prompts:
            parts.append(_one_or_many("Q", "questions", prompts))
        if self.targets is not None:
            answer = _one_or_many("target", "targets", [self.targets[i].strip() for i in chosen])
            if self.foils is not None:
                answer += " vs " + _one_or_many("foil", "foils", [self.foils[i].strip() for i in chosen])
            parts.append(answer)
        return textwrap.fill(" | ".join(parts), width=width)

    def suptitle(self, fig: Figure, examples: int | Sequence[int] | None = None, method: str | None = None,
                 fontsize: float = 8) -> None:
        """Set :meth:`title` as the figure's suptitle, wrapped to the figure's width."""
        width = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # characters per line
        fig.suptitle(self.title(examples, method, width=width), fontsize=fontsize)


def _one_or_many(one: str, many: str, values: list[str], sep: str = ": ") -> str:
    """``Q: 'text'`` when every shown example has the same value, else a count and the first."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:
        return f"{one}{sep}{distinct[0]!r}"
    return f"{many}{sep}{len(distinct)} distinct, e.g. {distinct[0]!r}"


# --- printing results --------------------------------------------------------------------------------


def summary_repr(name: str, *groups: Sequence[str]) -> str:
    """The one format results print in: ``Name(a, b; c, d)``, the items of a group joined by
    commas, the groups by semicolons, empty groups left out. Results across the library (attribution,
    benchmarks, circuits) use it, so a printed result always reads the same way."""
    parts = [", ".join(group) for group in groups if group]
    return f"{name}({'; '.join(parts)})"


def count(n: int, noun: str) -> str:
    """``'1 example'``, ``'3 examples'``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def number(value: float) -> str:
    """A number for a summary: three significant digits (``nan`` for a missing value)."""
    return f"{float(value):.3g}"


def decoded(tokenizer, ids: Tensor | None) -> list[str] | None:
    """The strings of token ids ``[batch]`` (None stays None)."""
    if ids is None:
        return None
    return [tokenizer.decode([int(t)]) for t in ids.tolist()]


# --- results that are tables -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class AttributionTable(AttributionResult):
    """A result whose measurements are one tidy table (``to_frame()``).

    For one release, DataFrame methods and indexing used directly on the result (``result["p"]``,
    ``result.groupby(...)``, ``len(result)``, ``result.plot(x=..., y=...)``) still reach the table,
    with a ``DeprecationWarning``: call ``to_frame()`` first. Where the result is no DataFrame
    stand-in: ``pd.concat`` and ``==`` need ``to_frame()``, and a column named like one of the
    result's fields (a knockout's ``window``) is read with ``to_frame()[name]``; printing the result
    shows its summary and the table's size, not the table.

    Attributes:
        table: the measurements (see the function that returns it for its columns).
    """

    table: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The measurements (a copy: the result stays unchanged)."""
        return self.table.copy()

    def plot(self, *args: Any, **kwargs: Any) -> Any:
        """The result's figure (:meth:`figure`); with ``DataFrame.plot``'s arguments, for one
        release, the table's pandas plot, with a ``DeprecationWarning``."""
        if args or kwargs:
            return self._frame(".plot(...)").plot(*args, **kwargs)
        return self.figure()

    def figure(self) -> Figure:
        """A Figure of the measurements."""
        raise NotImplementedError(f"{type(self).__name__} does not define figure()")

    # -- the DataFrame interface, for one release ----------------------------------------------------
    def _frame(self, what: str) -> pd.DataFrame:
        warnings.warn(f"{type(self).__name__} is no longer a DataFrame: {what} on it is deprecated and "
                      "will be removed in the next release; call .to_frame() first (e.g. "
                      "result.to_frame().groupby(...))", DeprecationWarning, stacklevel=3)
        return self.table

    def __getattr__(self, name: str) -> Any:
        # only reached for names the result does not have
        if name.startswith("_") or name in {f.name for f in fields(self)}:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if not hasattr(pd.DataFrame, name) and name not in self.table.columns:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self._frame(f".{name}"), name)

    def __getitem__(self, key: Any) -> Any:
        return self._frame("indexing")[key]

    def __len__(self) -> int:
        return len(self._frame("len()"))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._frame("iterating"))

    def __contains__(self, key: Any) -> bool:
        return key in self._frame("`in`")

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        """The summary of :class:`AttributionResult` with the table's size (the table itself:
        ``to_frame()``)."""
        rows, cols = self.table.shape
        return summary_repr(type(self).__name__, self._summary_head(),
                            [f"table {count(rows, 'row')} x {count(cols, 'column')}"],
                            *([part] for part in self._summary()))

    def _repr_html_(self) -> str:
        return self.table._repr_html_()


# --- the calling convention --------------------------------------------------------------------------

Translate = Callable[[tuple, dict], "tuple[tuple, dict, str] | None"]


def legacy_calls(translate: Translate, new_form: str) -> Callable[[Callable], Callable]:
    """Keep a function's previous call form working for one release, with a ``DeprecationWarning``.

    Args:
        translate: ``(args, kwargs) -> (args, kwargs, description)`` for a call in the old form
            (the call rewritten in the new form, and what was old about it), or None for a call in
            the new form.
        new_form: the new call form, for the warning (e.g. ``"dla(model, batch, target, foil=...)"``).

    ``inspect.signature`` of the wrapped function is the new signature.
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            legacy = translate(args, kwargs)
            if legacy is not None:
                args, kwargs, what = legacy
                warnings.warn(f"{fn.__name__}: {what} is deprecated and will stop working in the next "
                              f"release; call {new_form}", DeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)
        return call
    return wrap


def moved_to_keywords(n_positional: int, names: Sequence[str], renamed: dict[str, str] | None = None
                      ) -> Translate:
    """A ``translate`` for :func:`legacy_calls`: parameters that followed the first
    ``n_positional`` positionally and are keyword-only now, and keywords that were renamed
    (``{old: new}``)."""
    renamed = renamed or {}

    def translate(args: tuple, kwargs: dict) -> tuple[tuple, dict, str] | None:
        old = []
        kwargs = dict(kwargs)
        extra = args[n_positional:]
        if extra and len(extra) <= len(names):
            for name, value in zip(names, extra):
                if name in kwargs:
                    raise TypeError(f"got multiple values for argument {name!r}")
                kwargs[name] = value
            args = args[:n_positional]
            old.append(f"passing {', '.join(names[:len(extra)])} positionally")
        for before, after in renamed.items():
            if before in kwargs:
                if after in kwargs:
                    raise TypeError(f"got values for both {before!r} and its new name {after!r}")
                # a value also passed positionally makes the call raise its own TypeError
                kwargs[after] = kwargs.pop(before)
                old.append(f"the keyword {before}= (now {after}=)")
        return (args, kwargs, " and ".join(old)) if old else None
    return translate


# --- randomness --------------------------------------------------------------------------------------


@contextmanager
def seeded(seed: int, model=None) -> Iterator[None]:
    """Run a block with torch's global generators seeded as ``torch.manual_seed(seed)`` seeds them
    (the CPU's, and those of the CUDA devices that ``model`` sits on), and restore their states
    afterwards: the numbers are those of a global reseed, the caller's random state is untouched.

    Library code that must drive torch's global generator (captum's samplers draw from it) uses
    this; everything else takes a ``torch.Generator``.
    """
    cuda = sorted({p.device.index or 0 for p in model.hf.parameters() if p.device.type == "cuda"}) \
        if model is not None else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
