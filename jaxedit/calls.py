"""The calling convention of jaxedit's public functions: ``fn(model, data, *, tokenizer=..., ...)``.

The model and the data the call works on (``requests``, ``records``, ``pairs``, ``cases``, ``texts``, ``layers``)
are positional; everything else, the tokenizer included, is keyword-only. :func:`public` checks a call against that
convention and refuses the positional forms of earlier versions (``memit(model, requests, layers, tokenizer)``,
``counterfact_eval(model, records, tokenizer)``, ``layer_stats(model, tokenizer, layers)``) with a message that shows
the call to write instead; it also makes the call a :class:`jaxedit.runtime.progress_scope` (status lines, bars and
the heartbeat from Python; ``progress=False`` silences the call).
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Optional

from jaxedit import runtime
from jaxedit.errors import JaxeditError


class CallError(JaxeditError, TypeError):
    """A public function called outside its convention (a TypeError, and a JaxeditError for the command line)."""


def looks_like_tokenizer(x) -> bool:
    """A Hugging Face tokenizer (or anything that encodes and decodes like one)."""
    return callable(x) and hasattr(x, "decode") and (hasattr(x, "encode") or hasattr(x, "convert_ids_to_tokens"))


def public(data: str, old: tuple = (), n_data: int = 1, where: str = "jaxedit"):
    """Decorator for ``fn(model, <data>, *, ...)``. ``old``: the names the positional arguments after ``data`` had
    in earlier versions, in order (shown in the message that refuses them). ``n_data``: how many positionals the
    data is (``run_study(model, cfg, out)``: 2, ``data="cfg, out"``). ``where``: the module users import it from."""

    def deco(fn):
        name = f"{where}.{fn.__name__}"
        sig = inspect.signature(fn)
        # passed on where the function takes it (by name or in its **keywords), else taken by the wrapper: every
        # public call accepts progress=
        own = "progress" in sig.parameters or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > 1 + n_data or any(looks_like_tokenizer(a) for a in args[1:1 + n_data]):
                _refuse(name, data, args[1:], old, n_data)
            enabled = kwargs.get("progress", True) if own else kwargs.pop("progress", True)
            with runtime.progress_scope(enabled):
                return fn(*args, **kwargs)

        if not own:
            params = list(sig.parameters.values())
            at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
            params.insert(at, inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=True))
            sig = sig.replace(parameters=params)
        wrapper.__signature__ = sig
        return wrapper

    return deco


def _refuse(name: str, data: str, after_model: tuple, old: tuple, n_data: int = 1):
    """Raise the :class:`CallError` for positional arguments ``after_model`` (everything after the model)."""
    if any(looks_like_tokenizer(a) for a in after_model[:n_data]):  # the old (model, tokenizer, data) order
        keywords = [("tokenizer", "tokenizer")]
        why = f"the tokenizer goes by keyword, after the {data}"
    else:
        keywords = [("tokenizer" if looks_like_tokenizer(a) else (old[i] if i < len(old) else "..."),
                     "tokenizer" if looks_like_tokenizer(a) else "...") for i, a in enumerate(after_model[n_data:])]
        why = f"only the model and the {data} are positional"
    call = f"{name}(model, {data}" + "".join(f", {k}={v}" for k, v in keywords if k != "...") + ", ...)"
    raise CallError(f"{name}: {why}; call {call}")


# The MEMIT paper's names of the key-statistics settings (and layer_stats' earlier n_samples), accepted as aliases.
STATS_ALIASES = {"mom2_corpus": "corpus", "mom2_samples": "stats_samples", "mom2_n_samples": "stats_samples",
                 "n_samples": "stats_samples", "mom2_max_len": "max_len", "mom2_precision": "stats_precision",
                 "mom2_dtype": "stats_precision"}


def check_names(kw: dict, valid, aliases: Optional[dict] = None, what: str = "hyperparameter") -> dict:
    """``kw`` with aliases renamed to their names; unknown names are refused, each with the closest valid names
    (or, with none close, the list of valid ones)."""
    aliases = aliases or {}
    out, unknown = {}, []
    for k, v in kw.items():
        name = aliases.get(k, k)
        if name not in valid:
            close = difflib.get_close_matches(k, list(valid) + list(aliases), n=3, cutoff=0.6)
            close = list(dict.fromkeys(aliases.get(c, c) for c in close))
            unknown.append(f"{k!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
            continue
        if name in out:
            raise JaxeditError(f"{what} {name!r} given twice (as {name} and an alias)")
        out[name] = v
    if unknown:
        hint = "" if all("did you mean" in u for u in unknown) else f"; valid: {', '.join(sorted(valid))}"
        raise JaxeditError(f"unknown {what}{'s' * (len(unknown) > 1)} {', '.join(unknown)}{hint}")
    return out
