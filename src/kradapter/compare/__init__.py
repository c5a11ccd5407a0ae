"""The matrix-approximation study (``kradapter compare``): PEFT updates fitted to target matrices.

Modules: :mod:`.config` (the study file), :mod:`.inputs` (input files and the run's identity), :mod:`.matrices`
(targets), :mod:`.fit` (one cell), :mod:`.study` (every cell into the results store), :mod:`.results` (records and
the summary document), :mod:`.metrics`, :mod:`.plots`, :mod:`.cli`. Importing the package imports none of them.
"""
