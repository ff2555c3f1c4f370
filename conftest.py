"""pytest's setup for both test files: the hypothesis profile "ci" (python -m pytest
--hypothesis-profile=ci) draws the same examples on every run, so that a CI run can be repeated
exactly; without it, each run draws new examples (--hypothesis-seed=N repeats one)."""

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
