"""Does a per-layer "int16" choice help tfq.mixed_precision? Measured on the digits CNN and the MobileNet-style model.

For each model (trained as in scripts/budget_curve.py), on the below-Keras route (float .tflite → tfq's calibration
→ LiteRT's quantizer → INT4 rewrite, the route every file with an int16 layer takes):

- per layer, the test accuracy and size with that layer at int16 / float / int4 and the rest INT8, and the SQNR
  sensitivities the search uses;
- ``tfq.mixed_precision(max_drop=...)`` with the default choices (int4, int8, float; Keras route) and with
  ``"int16"`` added, and the budget curve (every point of the allocation path) for both choice sets on the
  below-Keras route, so the comparison is route for route.

    PYTHONPATH=$PWD python scripts/int16_mixed.py --output=int16_mixed.json
"""

from __future__ import annotations

import json

from absl import app, flags
from benchmark_lib import trained_precision_model

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "int16_mixed.json", "Where to write the JSON results.")
flags.DEFINE_list("models", ["digits_cnn", "mobilenet_style"], "Models: digits_cnn, mobilenet_style.")
flags.DEFINE_list("max_drops", ["0.0", "0.005", "0.01"], "max_drop values of the mixed_precision runs.")
flags.DEFINE_integer("num_threads", 2, "Interpreter threads.")


def main(argv):
    del argv
    from tfq.analysis import precision
    from tfq.core.fileio import atomic_write_text

    results = {}
    for name in FLAGS.models:
        model, (x_train, _), (x_test, y_test) = trained_precision_model(name)
        rep = x_train[:256]
        search = precision._prepare(model, rep, x_test, y_test, "accuracy", None, "nearest", FLAGS.num_threads, False,
                                    "int16_mixed", below_keras=True)
        names = [layer.name for layer in search.layers]
        baseline = float(search.metric(y_test, model.predict(x_test, verbose=0)))
        omega = precision._sensitivities(search, "sqnr", precision.ALL_CHOICES, 1, 0)
        int8 = dict.fromkeys(names, "int8")
        layers = []
        for n in names:
            row = {"layer": n, "omega": omega[n]}
            for c in ("int16", "float", "int4"):
                m = search.measure({**int8, n: c})
                row[c] = {"size": m["size"], "accuracy": m["metric"]}
            layers.append(row)
        ref = search.measure(int8)
        print(f"## {name}: float {baseline:.4f}, below-Keras INT8 {ref['size']} B {ref['metric']:.4f}")
        for r in layers:
            print(f"{r['layer']}: " + ", ".join(f"{c} {r[c]['size']} B {r[c]['accuracy']:.4f} Ω {r['omega'][c]:.3g}"
                                               for c in ("int16", "float", "int4")))
        curves, paths = {}, {}
        for label, choices in (("int4,int8,float", precision.CHOICES), ("int4,int8,int16,float", precision.ALL_CHOICES)):
            path = precision.allocation_path(search.layers, omega, choices, search.layer_bytes)
            points = []
            for a in path:
                m = search.measure(a)
                points.append({"size": m["size"], "accuracy": m["metric"], "drop": baseline - m["metric"],
                               "counts": {c: sum(v == c for v in a.values()) for c in precision.ALL_CHOICES}})
            curves[label], paths[label] = points, path
        runs = {}
        for d in (float(v) for v in FLAGS.max_drops):
            for label, choices in (("default", precision.CHOICES), ("with int16", precision.ALL_CHOICES)):
                r = precision.mixed_precision(model, rep, x_test, y_test, max_drop=d, choices=choices,
                                              num_threads=FLAGS.num_threads)
                runs[f"{d} {label}"] = {"size": r.size, "accuracy": r.metric, "drop": r.drop, "met": r.met,
                                        "assignment": r.assignment, "seconds": r.settings["seconds"]}
                print(f"max_drop {d} {label}: {r.size} B acc {r.metric:.4f} met {r.met} "
                      f"{precision._describe(r.assignment)} ({r.settings['seconds']} s)")
        for label, points in curves.items():
            for d in (float(v) for v in FLAGS.max_drops):
                ok = [p for p in points if p["drop"] <= d + 1e-12]
                best = min(ok, key=lambda p: p["size"]) if ok else None
                print(f"curve {label}: smallest point with drop <= {d}: {best}")
        # the smallest point within 1 pt on the curve without int16: its INT8 layers at int16 instead, or float
        swaps = []
        ok = [(p, a) for p, a in zip(curves["int4,int8,float"], paths["int4,int8,float"]) if p["drop"] <= 0.01 + 1e-12]
        if ok:
            point, assignment = min(ok, key=lambda pa: pa[0]["size"])
            for n in [n for n in names if assignment[n] == "int8"]:
                row = {"layer": n, "int8": {"size": point["size"], "accuracy": point["accuracy"]}}
                for c in ("int16", "float"):
                    m = search.measure({**assignment, n: c})
                    row[c] = {"size": m["size"], "accuracy": m["metric"]}
                swaps.append(row)
                print(f"swap at {point['size']} B: {n} " + ", ".join(
                    f"{c} {row[c]['size']} B {row[c]['accuracy']:.4f}" for c in ("int8", "int16", "float")))
        results[name] = {"baseline": baseline, "int8_below_keras": ref, "layers": layers, "curves": curves,
                         "runs": runs, "swaps": swaps}
    atomic_write_text(FLAGS.output, json.dumps(results, indent=1, default=float) + "\n")


if __name__ == "__main__":
    app.run(main)
