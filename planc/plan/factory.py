"""Calling the code a plan names: `model.factory` and `train.data`.

Where it may come from is planc.plan.trust's rule (checked from the text by the loader,
and again here on the imported object); what it must return is checked here, so a
wrong factory is one placed error line, never an internal error later on.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import torch

from planc.errors import FactoryError, PlanError
from planc.plan.trust import refused_object, refused_path
from planc.plan.types import Factory, Plan


def call_factory(plan: Plan, where: str = "model.factory", factory: Optional[Factory] = None):
    """Import the plan's `module:callable` at `where` ("model.factory" or "train.data";
    the callable may be dotted) and call it with its kwargs. `factory` replaces the
    plan's own. A name that does not import is a PlanError at the key's line (the plan
    is wrong); code that raises is a FactoryError (the user's code failed)."""
    if factory is None:
        factory = plan.model.factory if where == "model.factory" else plan.train.data
    if factory is None:
        raise PlanError([plan.problem(where, f"expected {where} in the plan, to build the model and data from")])
    module_name, sep, attr = factory.path.partition(":")
    if not sep or not module_name or not attr:
        raise PlanError([plan.problem(where, f"expected 'module:callable', got {factory.path!r}")])
    why = refused_path(factory.path)
    if why:                            # a Plan built in Python skips the loader's check
        raise PlanError([plan.problem(where, f"refused {factory.path!r}: {why}")])
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise PlanError([plan.problem(where, f"cannot import {factory.path!r}: {err}")]) from None
    except Exception as err:          # the module itself raised while importing
        raise FactoryError(f"{plan.problem(where, f'importing {factory.path!r} raised {_describe(err)}')}") from err
    if not callable(obj):
        raise PlanError([plan.problem(where, f"{factory.path!r} is not callable")])
    why = refused_object(obj)
    if why:                            # e.g. 'mypkg:os.system' reaches the standard library
        raise PlanError([plan.problem(where, f"refused {factory.path!r}: {why}")])
    try:
        made = obj(**factory.kwargs_dict())
    except Exception as err:
        raise FactoryError(f"{plan.problem(where, f'{factory.path!r} raised {_describe(err)}')}") from err
    if where == "model.factory" and not isinstance(made, torch.nn.Module):
        raise FactoryError(str(plan.problem(where, f"{factory.path!r} returned {describe_value(made)}, expected a torch.nn.Module")))
    if where == "train.data" and not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise FactoryError(str(plan.problem(where, f"{factory.path!r} returned {describe_value(made)}, "
                                                   "expected a pair (train_loader, eval_loader)")))
    return made


def describe_value(value: Any) -> str:
    """'a list of 3', 'a dict', 'None': what a factory or a model returned, for messages."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _describe(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
