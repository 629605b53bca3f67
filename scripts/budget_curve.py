"""Size against accuracy for the per-layer precision search (tfq.mixed_precision), against uniform INT8 and W4A8.

For each model (the packaged-digits CNN, the MobileNet-style model), trained as in the test fixtures:

- the sensitivity study: per-layer Hessian (HAWQ-v2) and SQNR estimates against the accuracy drop and
  cross-entropy increase measured through LiteRT with one layer at 4 bits (the rest INT8), Spearman's ρ;
- the budget curve: every point of the allocation path (float → INT8 → INT4, layer by layer) converted and
  measured, for each sensitivity, with the point chosen at each size budget (fraction of the INT8 file);
- ``tfq.mixed_precision(max_drop=...)``'s choice with the default sensitivity.

Accuracy is on the test split (359 samples, one sample = 0.28 pt); the study's truth also on the
training samples not used for calibration (x_train[256:]), so fewer ties.

    PYTHONPATH=$PWD python scripts/budget_curve.py --output=budget_curve.json
"""

from __future__ import annotations

import json

from absl import app, flags
from benchmark_lib import trained_precision_model

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "budget_curve.json", "Where to write the JSON results.")
flags.DEFINE_list("models", ["digits_cnn", "mobilenet_style"], "Models: digits_cnn, mobilenet_style.")
flags.DEFINE_list("budgets", ["0.55", "0.6", "0.7", "0.8", "0.9", "1.0"], "Size budgets, fractions of the INT8 file.")
flags.DEFINE_float("max_drop", 0.01, "max_drop of the mixed_precision run.")
flags.DEFINE_list("sensitivities", ["sqnr", "hessian"], "Sensitivities whose curves are measured.")
flags.DEFINE_integer("num_threads", 2, "Interpreter threads.")


def main(argv):
    del argv
    import numpy as np

    from tfq.analysis import precision
    from tfq.core.fileio import atomic_write_text

    budgets = [float(b) for b in FLAGS.budgets]
    results = {}
    for name in FLAGS.models:
        model, (x_train, y_train), (x_test, y_test) = trained_precision_model(name)
        rep = x_train[:256]
        study = precision.sensitivity_study(model, rep, np.concatenate([x_test, x_train[256:]]),
                                            np.concatenate([y_test, y_train[256:]]), num_threads=FLAGS.num_threads)
        study_test = precision.sensitivity_study(model, rep, x_test, y_test, num_threads=FLAGS.num_threads)
        curves = {s: precision.budget_curve(model, rep, x_test, y_test, budgets=budgets, sensitivity=s,
                                            num_threads=FLAGS.num_threads) for s in FLAGS.sensitivities}
        chosen = precision.mixed_precision(model, rep, x_test, y_test, max_drop=FLAGS.max_drop,
                                           num_threads=FLAGS.num_threads)
        results[name] = {"study": study, "study_test_only": study_test, "curves": curves,
                         "mixed_precision": {**chosen.to_dict(), "table": chosen.to_markdown()}}
        print(f"## {name}\n\n{precision.study_markdown(study)}\n\n{chosen.to_markdown()}\n")
        for s, curve in curves.items():
            print(f"{s}: " + "; ".join(f"{b['fraction']:g}×: {b['size']} B {b['metric']}" for b in curve["budgets"]))
    atomic_write_text(FLAGS.output, json.dumps(results, indent=1, default=float) + "\n")


if __name__ == "__main__":
    app.run(main)
