"""``kradapter finetune``: every method fine-tunes a real pretrained model on real data at an equal budget.

Modules: :mod:`.data` (corpus and splits), :mod:`.protocol` (methods, recipe, learning-rate grids),
:mod:`.models` (head, target layers, per-method setup), :mod:`.train` (Trainer, time, memory),
:mod:`.runner` (sweep, runs, resume), :mod:`.report` (table and Pareto plot), :mod:`.cli`.
"""
