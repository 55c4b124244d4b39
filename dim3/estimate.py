"""How long a sweep or an evaluation will take, from costs measured on this machine.

A run is models x questions answered, plus one in-memory merge per merged model. The cost of one
answer and of one merge by each method are measured as runs go (:class:`CostBook`, one per
server process, keyed by the VLM) and turned into an estimate before the next run starts; the
first run of a VLM measures its answer cost on the first model and says the estimate then. This
module knows no model and no UI; it only counts and divides.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

# Methods that solve a problem per matrix (SVD, optimisation): their merge costs far more than
# the answers on a small model (on the demo trio, minutes on a busy 2-core CPU for WUDI).
SLOW_METHODS = frozenset({"tsv", "iso_c", "iso_cts", "wudi", "optmerge"})


def clock(seconds: float) -> str:
    """Seconds as ``m:ss`` (``h:mm:ss`` past an hour)."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Mean:
    total: float = 0.0
    count: float = 0.0

    def add(self, seconds: float, n: float = 1.0) -> None:
        self.total += seconds
        self.count += n

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class CostBook:
    """Measured seconds per answer (per VLM) and per merge (per VLM and method); thread-safe."""

    def __init__(self) -> None:
        self._answers: dict[str, _Mean] = {}
        self._merges: dict[tuple[str, str], _Mean] = {}
        self._lock = threading.Lock()

    def record_answers(self, vlm: str, questions: int, seconds: float) -> None:
        """``questions`` answered by one model of ``vlm`` in ``seconds``."""
        if questions > 0 and seconds > 0:
            with self._lock:
                self._answers.setdefault(vlm, _Mean()).add(seconds, questions)

    def record_merge(self, vlm: str, method: str, seconds: float) -> None:
        """One in-memory merge of ``vlm`` by ``method`` took ``seconds``."""
        if seconds > 0:
            with self._lock:
                self._merges.setdefault((vlm, method), _Mean()).add(seconds)

    def per_answer(self, vlm: str) -> float | None:
        with self._lock:
            m = self._answers.get(vlm)
            return m.value() if m else None

    def per_merge(self, vlm: str, method: str) -> float | None:
        with self._lock:
            m = self._merges.get((vlm, method))
            return m.value() if m else None

    def estimate(self, vlm: str, questions: int, merges: Sequence[str]) -> float | None:
        """Seconds for the original plus one model per entry of ``merges`` (method names), each
        answering ``questions``; None until an answer cost of ``vlm`` has been measured. A merge
        not measured yet counts as the mean of the measured ones (zero when none is)."""
        answer = self.per_answer(vlm)
        if answer is None:
            return None
        known = [c for c in (self.per_merge(vlm, m) for m in set(merges)) if c is not None]
        fallback = sum(known) / len(known) if known else 0.0
        merge_cost = sum(self.per_merge(vlm, m) or fallback for m in merges)
        return answer * questions * (1 + len(merges)) + merge_cost


def plan_text(
    book: CostBook, vlm: str, questions: int, merges: Sequence[str], what: str = "models"
) -> str:
    """One line said before a run starts: its size, the estimate (or when it will be said) and
    a warning for slow methods."""
    models = 1 + len(merges)
    text = f"{models} {what} × {questions} questions"
    seconds = book.estimate(vlm, questions, merges)
    if seconds is None:
        text += "; the time is measured on the first model and said then"
    else:
        text += f"; about {clock(seconds)} on this machine (measured on earlier runs)"
    slow = sorted(SLOW_METHODS.intersection(merges))
    if slow and any(book.per_merge(vlm, m) is None for m in slow):
        text += f". {', '.join(slow)} solve a problem per matrix and can take minutes each"
    return text + "."


def remaining_text(
    book: CostBook, vlm: str, questions: int, merges_left: Sequence[str], answers_left: int
) -> str:
    """``~m:ss left`` for ``answers_left`` more models' answers and ``merges_left`` merges;
    empty when no answer cost is known."""
    answer = book.per_answer(vlm)
    if answer is None:
        return ""
    known = [c for c in (book.per_merge(vlm, m) for m in set(merges_left)) if c is not None]
    fallback = sum(known) / len(known) if known else 0.0
    merges = sum(book.per_merge(vlm, m) or fallback for m in merges_left)
    return f"~{clock(answer * questions * answers_left + merges)} left"


BOOK = CostBook()  # this process's measurements (the app's server keeps them while it runs)
