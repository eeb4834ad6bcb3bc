"""Experiments: grids of runs, where they execute, their tables and reports, and re-evaluation,
a module per job.

- :mod:`~fedssd.experiments.grid`: grid files (settings, rows, seeds, columns).
- :mod:`~fedssd.experiments.plan`: one checked config and run folder per planned run.
- :mod:`~fedssd.experiments.execute`: running the planned runs still to do.
- :mod:`~fedssd.experiments.tables`: ``results.csv`` and ``table.md`` (statistics, rendering).
- :mod:`~fedssd.experiments.report`: figures and ``report.md``.
- :mod:`~fedssd.experiments.evaluate`: re-evaluating a finished run (kNN, linear probe,
  fine-tuning).

The command-line parsers of ``fedssd sweep``, ``fedssd report`` and ``fedssd eval`` live in
:mod:`fedssd.cli`.
"""
