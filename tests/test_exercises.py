"""The exercise checker of the notebooks: unanswered, right and wrong answers, and a wrong filled-in solution."""

import pytest

from daunce.experiments import exercises


def test_unanswered_right_and_wrong(capsys):
    assert exercises.check("Exercise 1", None, lambda a: a == 4, hint="h") is None
    assert exercises.check("Exercise 1", 4, lambda a: a == 4, hint="h") is True
    assert exercises.check("Exercise 1", 3, lambda a: a == 4, hint="the covariance is quadratic in rho") is False
    assert exercises.check("Exercise 1", "four", lambda a: abs(float(a) - 4) < 0.2, hint="a number") is False
    out = capsys.readouterr().out.splitlines()
    assert out == ["Exercise 1: not answered yet", "Exercise 1: correct",
                   "Exercise 1: not quite (3): the covariance is quadratic in rho",
                   "Exercise 1: not quite ('four'): a number"]


def test_filled_in_solutions_must_pass():
    assert exercises.check("Exercise 2", "lower", lambda a: a == "lower", hint="h", solutions=True) is True
    with pytest.raises(AssertionError, match="Exercise 2: the filled-in solution 'raise' fails"):
        exercises.check("Exercise 2", "raise", lambda a: a == "lower", hint="h", solutions=True)
    with pytest.raises(AssertionError, match="Exercise 3: answers=True but the solution was not filled in"):
        exercises.check("Exercise 3", None, lambda a: True, hint="h", solutions=True)
