"""`python`: import a callable by name and call it; its return value is the result.

Payload:
    callable      "package.module:function" (the part after ":" may be dotted,
                  e.g. "pkg.mod:Class.method")
    args          optional list of positional arguments
    kwargs        optional {name: value} of keyword arguments
    pass_context  optional bool, default false: pass the JobContext as the first argument
    sys_path      optional list of directories to put in front of sys.path for this job

The callable runs in the runner process, so it may raise `semantica.PermanentError`
or `semantica.RetryableError` like any plugin, and must return something JSON-able
(or a `semantica.plugins.Output`). A callable that cannot be found fails the job.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

from semantica.plugins import JobContext
from semantica_runners._payload import PayloadError, reject_unknown

KEYS = {"callable", "args", "kwargs", "pass_context", "sys_path"}


def python(ctx: JobContext) -> Any:
    payload = ctx.payload
    reject_unknown(payload, KEYS, "python")
    target = payload.get("callable")
    args = payload.get("args", [])
    kwargs = payload.get("kwargs", {})
    pass_context = payload.get("pass_context", False)
    sys_path = payload.get("sys_path", [])
    if not isinstance(args, list):
        raise PayloadError(f"python: 'args' must be a list, got {args!r}")
    if not isinstance(kwargs, dict):
        raise PayloadError(f"python: 'kwargs' must be an object, got {kwargs!r}")
    if not isinstance(pass_context, bool):
        raise PayloadError(f"python: 'pass_context' must be true or false, got {pass_context!r}")
    if not isinstance(sys_path, list) or not all(isinstance(p, str) for p in sys_path):
        raise PayloadError(f"python: 'sys_path' must be a list of strings, got {sys_path!r}")
    sys.path[:0] = sys_path
    try:
        func = resolve(target)
        ctx.logger.info("python: calling %s", target)
        if pass_context:
            return func(ctx, *args, **kwargs)
        return func(*args, **kwargs)
    finally:  # this job's directories only: a WARM worker runs job after job
        for entry in sys_path:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def resolve(target: Any) -> Any:
    """The callable that "module:attribute.path" names, or a PayloadError saying why not."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise PayloadError(f"python: 'callable' must be 'module:function', got {target!r}")
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise PayloadError(f"python: 'callable' must be 'module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PayloadError(f"python: cannot import module {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PayloadError(f"python: {target!r}: no attribute {part!r}") from exc
    if not callable(obj):
        raise PayloadError(f"python: {target!r} is not callable: {obj!r}")
    return obj
