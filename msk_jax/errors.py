"""The error every reader raises for a file it cannot use, so that readers and the pipeline that
turns it into a named skip share it without importing each other."""

from __future__ import annotations


class DataError(ValueError):
    """A data file (or entry) that cannot be used; says which file and what is wrong."""

    def __init__(self, path: str, problem: str, reason: str = "invalid"):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.reason = path, problem, reason
