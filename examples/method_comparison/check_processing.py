"""Load exported ``kradapter finetune`` results with PEFT's own ``method_comparison/processing.py``.

    python examples/method_comparison/check_processing.py PATH/TO/peft/method_comparison RESULTS_DIR

``RESULTS_DIR`` is a finished ``kradapter finetune`` folder; its runs are exported with
:func:`kradapter.method_comparison.export_results` into a temporary folder, read with PEFT's ``load_df`` (task
``MetaMathQA``, whose result format they follow) and its Pareto front of memory against test accuracy is printed.
Needs pandas (PEFT's app requirement). Exit status 0 when every run loads unchanged.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from kradapter.method_comparison import export_results


def main(peft_method_comparison: str, results_dir: str) -> int:
    sys.path.insert(0, str(Path(peft_method_comparison).resolve()))
    import processing  # PEFT's, unchanged

    with tempfile.TemporaryDirectory() as out:
        paths = export_results(results_dir, out)
        df = processing.load_df(out, "MetaMathQA")
        prefs = processing.get_metric_preferences("MetaMathQA")
        front = processing.compute_pareto_frontier(df, "accelerator_memory_max", "test_accuracy", prefs)
    columns = ["experiment_name", "peft_type", "test_accuracy", "forgetting*", "accelerator_memory_max"]
    print(df[[*columns, "num_trainable_params", "file_size", "train_time"]].to_string(index=False))
    print("Pareto front (memory vs test accuracy):", ", ".join(front["experiment_name"]))
    if len(df) != len(paths):
        print(f"error: {len(paths)} files written, {len(df)} loaded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
