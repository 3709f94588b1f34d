"""What a worker does when its engine dies: resubmit the rows in flight, look for the one
that kills it, or stop.

The rows in flight did nothing wrong until shown otherwise; a death is most often the
machine's (the OOM killer, a GPU fault). The rules, per worker:

1. A death whose rows in flight were not in flight at the previous death: load a new
   engine and resubmit them all. These deaths blame no row; past `engine.max_restarts` of
   them the job fails without writing its rows in flight (a rerun resumes them).
2. A death with rows in flight that were in flight at the previous death too: those are
   suspects. The new engine runs half of them and nothing else (the other rows wait): a
   death keeps that half as the suspects, a clean finish writes it and leaves the other
   half. A row that kills the engine while it runs alone is written `engine_error` with
   the cause, and the job goes on. One row costs at most ceil(log2(rows in flight)) + 1
   loads besides the death of rule 1, whatever `max_restarts` is (0 fails at the first
   death); a search that ends blaming no row (a combination of rows, or chance) counts
   as one death of rule 1.
3. A death after a row was blamed, before any row finished since: the engine seems to die
   of every request, so the job stops at once; a rerun dies the same way until the cause
   is fixed.

Rows are named by their keys here; the pipeline holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Verdict:
    """After a death: `blame` a row (it killed the engine alone), then load a new engine
    and submit `run` (None: every row waiting, and new rows again); or `stop` the job
    with that message, loading nothing."""

    run: list[str] | None = None
    blame: str | None = None
    stop: str | None = None


@dataclass
class Triage:
    max_restarts: int
    deaths: int = 0
    unblamed: int = 0  # deaths no row was blamed for (rule 1, and searches that found none)
    blamed: list[str] = field(default_factory=list)
    suspects: list[str] | None = None  # searching: one of them may kill the engine
    trial: list[str] = field(default_factory=list)  # the suspects running now, alone
    _previous: set[str] = field(default_factory=set)  # in flight at the previous death
    _progress: bool = True  # a row finished since the last row was blamed

    @property
    def searching(self) -> bool:
        return self.suspects is not None

    def finished(self) -> None:
        """A row came out of the engine (whatever its status)."""
        self._progress = True

    def died(self, in_flight: list[str], cause: str, waiting: int = 0) -> Verdict:
        """`in_flight`: the rows in the engine when it died, in the order they entered;
        `waiting`: rows held back besides them, for the message."""
        self.deaths += 1
        lost = len(in_flight) + waiting
        if not self._progress:
            return Verdict(stop=(
                f"the engine died {_times(self.deaths)} ({cause}): running request "
                f"{self.blamed[-1]} (row_index:sample) alone, then again before any other "
                f"request finished, so every request seems to kill it and the job stops. "
                f"{lost} rows were not written; a rerun dies the same way until the cause "
                "is fixed"))
        if self.suspects is not None:
            return self._narrowed(in_flight)
        repeated = [k for k in in_flight if k in self._previous]
        self._previous = set(in_flight)
        if repeated and self.max_restarts > 0:
            if in_flight == repeated and len(repeated) == 1:
                return self._blamed(repeated[0])  # it ran alone, twice
            self.suspects = repeated
            return self._next_trial()
        self.unblamed += 1
        if self.unblamed > self.max_restarts:
            return Verdict(stop=(
                f"the engine died {_times(self.deaths)} ({cause}); {lost} rows in flight "
                "were not written, a rerun of the same job resumes them"))
        return Verdict()

    def trial_passed(self) -> list[str] | None:
        """The trial's rows all finished: the suspects left, half of them to run next;
        None when none are left (the search ends, no row blamed)."""
        assert self.suspects is not None
        self.suspects = [k for k in self.suspects if k not in set(self.trial)]
        if self.suspects:
            return self._next_trial().run
        self._end()
        self.unblamed += 1
        return None

    def _narrowed(self, in_flight: list[str]) -> Verdict:
        if len(in_flight) == 1:
            return self._blamed(in_flight[0])
        self.suspects = list(in_flight)  # the trial's rows that had not finished
        return self._next_trial()

    def _next_trial(self) -> Verdict:
        assert self.suspects is not None
        self.trial = self.suspects[:(len(self.suspects) + 1) // 2]
        return Verdict(run=list(self.trial))

    def _blamed(self, key: str) -> Verdict:
        self.blamed.append(key)
        self._progress = False
        self._end()
        return Verdict(blame=key)

    def _end(self) -> None:
        self.suspects, self.trial, self._previous = None, [], set()


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"
