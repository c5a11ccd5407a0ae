"""Fine-tuning studies on one execution core: ``kradapter finetune`` (every method at an equal budget) and
``kradapter shift`` (in- and out-of-distribution accuracy).

Core: :mod:`.protocol` (the recipe, settings, up-front checks), :mod:`.data` (corpus and splits), :mod:`.plan`
(data split, model probed, methods sized), :mod:`.strategies` (head-only, full and adapter training),
:mod:`.models` (head, target layers), :mod:`.train` (Trainer, time, memory), :mod:`.runner` (the executor: sweep,
chosen rate, runs, resume), :mod:`.commands` (the shared flags and checks). Studies: :mod:`.cli` and :mod:`.report`
(finetune); :mod:`.shift_cli`, :mod:`.shift_settings`, :mod:`.shift`, :mod:`.shift_data` and :mod:`.shift_report`
(shift).
"""
