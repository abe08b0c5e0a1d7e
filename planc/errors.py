"""planc's error types. Every error a user can cause is one of these, and the CLI
prints each problem as one line; library code never calls sys.exit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class PlancError(Exception):
    """Base of every error planc raises on purpose. The CLI prints `str(err)`."""


@dataclass(frozen=True)
class Problem:
    """One diagnostic: where (file, 1-based line and column, JSON path) and what."""

    message: str
    path: str = ""            # JSON path in the plan, e.g. "targets.rules[1].block"
    file: str = "<plan>"
    line: int = 0             # 0: position unknown (e.g. a plan given as a dict)
    col: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PlanError(PlancError):
    """A plan is invalid. Holds every problem found, in file order."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PassError(PlancError):
    """A graph pass failed. Names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, message: str, ran_before: Sequence[str] = ()):
        self.pass_name = pass_name
        self.message = message
        self.ran_before = tuple(ran_before)
        after = f" (after {', '.join(self.ran_before)})" if self.ran_before else ""
        super().__init__(f"pass {pass_name}{after}: {message}")


class TraceError(PlancError):
    """A model could not be traced by any frontend; the message names module and reason."""


class SelectError(PlancError):
    """The plan's rules do not fit the model (a rule that matches nothing, ...). `path`
    is the plan key at fault ("targets.rules[0]"); `placed(plan)` puts the message at
    that key's file:line:col, as the loader's errors are."""

    def __init__(self, message: str, path: str = ""):
        self.path, self.detail = path, message
        super().__init__(f"{path}: {message}" if path else message)

    def placed(self, plan) -> "SelectError":
        if not self.path or getattr(plan, "positions", None) is None:
            return self                         # a plan built in Python: no file to point into
        return SelectError(str(plan.problem(self.path, self.detail)))


class FactoryError(PlancError):
    """Code a plan names (model.factory, train.data) raised when imported or called;
    the message places the plan key and names the exception."""


class RuntimeStateError(PlancError):
    """The pruning runtime was used wrongly or given state it cannot load."""


class RunFolderError(PlancError):
    """A run folder or checkpoint is missing, corrupt or tampered with."""


class OutputFolderError(RunFolderError):
    """The output folder holds something a run must not overwrite (another plan's run, a
    finished run, files planc did not write). Nothing in it was touched."""
