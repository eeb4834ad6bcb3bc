"""Runs: what one run keeps and how it is read back, below everything that trains.

- :mod:`~fedssd.runs.outputs`: run-folder files (atomic writes, JSON, models).
- :mod:`~fedssd.runs.checkpoint`: round checkpoints, verified on load.
- :mod:`~fedssd.runs.store`: the client store (per-client state between rounds).
- :mod:`~fedssd.runs.resolve`: a run's resolved config (:func:`~fedssd.runs.resolve.load_config`).
- :mod:`~fedssd.runs.model`: a run's model, initial (:func:`~fedssd.runs.model.make_model`) and
  trained (:func:`~fedssd.runs.model.load_run`).
- :mod:`~fedssd.runs.sites`: the per-site table of ``summary.json`` and ``fedssd report``.
- :mod:`~fedssd.runs.resume`: where an interrupted or extended run continues from, and the
  restoring of its checkpoint.
"""
