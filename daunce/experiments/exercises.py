"""Exercises in the notebooks: a reader's answer, checked by a cell.

Each exercise has an answer variable that starts as ``None`` and a check cell that calls :func:`check`. A notebook
with a papermill parameter ``answers=True`` fills in the solutions before checking (the smoke run in
``tests/test_notebooks.py`` does), and then a wrong solution fails the run instead of printing a hint.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["NOT_ANSWERED", "check"]

#: what a check prints for an answer that is still ``None``
NOT_ANSWERED = "not answered yet"


def check(name: str, answer: Any, is_correct: Callable[[Any], bool], *, hint: str,
          solutions: bool = False) -> Optional[bool]:
    """Print whether ``answer`` to exercise ``name`` is right and return it (``None`` while unanswered).

    Prints ``"<name>: not answered yet"`` for ``answer=None``, ``"<name>: correct"`` when ``is_correct(answer)``, and
    ``"<name>: not quite (<answer>): <hint>"`` otherwise (also where ``is_correct`` cannot read the answer: a
    ``TypeError`` or ``ValueError``). With ``solutions=True`` (the notebook filled in its own
    solutions) an unanswered or wrong answer raises ``AssertionError`` naming the exercise, so a solution that no
    longer fits the notebook's numbers fails the run."""
    if answer is None:
        print(f"{name}: {NOT_ANSWERED}")
        if solutions:
            raise AssertionError(f"{name}: answers=True but the solution was not filled in")
        return None
    try:
        ok = bool(is_correct(answer))
    except (TypeError, ValueError):  # an answer of the wrong kind (a string for a number, say) is a wrong answer
        ok = False
    print(f"{name}: correct" if ok else f"{name}: not quite ({answer!r}): {hint}")
    if solutions and not ok:
        raise AssertionError(f"{name}: the filled-in solution {answer!r} fails its check ({hint})")
    return ok
