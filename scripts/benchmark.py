"""Benchmark tfq against the plain TFLite converter and tfmot; writes the figures as JSON.

    python scripts/benchmark.py --output=results.json [--models=digits_cnn,digits_transformer] [--quick] [--compression]
        [--timing_repeats=3]
    python scripts/benchmark.py --models= --methods --output=methods.json   # methods beyond calibration only
    python scripts/benchmark.py --models= --nomethods --nocalibration \
        --qat_cost=digits_cnn,mobilenet_v2_a0.35_32px,mobilenet_v2_a1.0_96px --output=qat.json  # QAT cost only
        [--qat_seeds=4]   # INT8 accuracy of the QAT rows over 4 shuffling seeds (mean and each)
    python scripts/benchmark.py --sections=int4,kinds --output=scripts/benchmark_results.json
        # only these sections (4-bit weights vs LiteRT's quantizer; one row per model kind vs the plain
        # converter), written into the existing results file (its other sections kept)
"""

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "benchmark_results.json", "Where to write the JSON results.")
flags.DEFINE_list("models", ["digits_cnn", "mobilenet_style", "digits_transformer", "digits_lstm"],
                  "Models to benchmark.")
flags.DEFINE_integer("num_threads", 2, "Interpreter threads for latency.")
flags.DEFINE_boolean("quick", False, "Few epochs: a smoke run, figures not meaningful.")
flags.DEFINE_string("markdown", None, "Optional path for a Markdown table of the main figures.")
flags.DEFINE_boolean("compression", False, "Add the compression section (pruning, clustering, distillation, tfmot "
                     "pruning on the digits CNN; ~4 minutes).")
flags.DEFINE_integer("timing_repeats", None, "Timed (plain converter, tfq) pairs per calibration method: the time "
                     "ratios are their median and spread (default 3; 1 with --quick).")
flags.DEFINE_boolean("methods", True, "Include the methods beyond calibration (equalization, bias correction, "
                     "AdaRound, GPTQ, data-free) on MobileNet-style models, per tensor and per channel, and W4A8.")
flags.DEFINE_list("qat_cost", ["mobilenet_v2_a0.35_96px"], "QAT step-time ratio and INT8 accuracy, tfq against tfmot "
                  "from the same float weights, on these models (benchmark_lib.QAT_COST_MODELS: digits_cnn, "
                  "mobilenet_v2_a{0.35,1.0}_{32,96}px); empty to skip.")
flags.DEFINE_list("qat_bn_folding", ["unfolded"], "tfq QAT rows of the QAT-cost section, one per bn_folding mode "
                  "(unfolded, two_pass).")
flags.register_validator("qat_bn_folding", lambda v: set(v) <= {"unfolded", "two_pass"},
                         "--qat_bn_folding takes unfolded and/or two_pass, comma-separated")
flags.DEFINE_list("qat_logits_range", ["tensor"], "tfq QAT rows of the QAT-cost section, one per logits_range "
                  "(tensor, softmax; see tfq.qat.quantize_model) and bn_folding mode.")
flags.register_validator("qat_logits_range", lambda v: set(v) <= {"tensor", "softmax"},
                         "--qat_logits_range takes tensor and/or softmax, comma-separated")
flags.DEFINE_integer("qat_seeds", 1, "Shuffling seeds per QAT-cost row: INT8 accuracy is reported per seed and as "
                     "their mean (the first seed is the timed run; the others train untimed).", lower_bound=1)
flags.DEFINE_integer("qat_cost_rounds", None, "Timed float/QAT epoch pairs per QAT-cost run (default: per model).")
flags.DEFINE_list("sections", [], "Run only these sections and update them in --output (other keys kept): int4 "
                  "(W4A8 / w4_dynamic / w4_weight_only against LiteRT's quantizer on the digits CNN, MobileNet-style "
                  "model and digits transformer), kinds (one row per model kind against the plain converter).")
flags.register_validator("sections", lambda v: set(v) <= {"int4", "kinds"}, "--sections takes int4 and/or kinds")
flags.DEFINE_boolean("calibration", True, "Calibration throughput (samples/s) per method and memory against the "
                     "number of samples (5,000 and 50,000).")


def main(argv):
    del argv
    import json

    from benchmark_lib import run_benchmark, to_markdown
    from tfq.cli.flags import quiet_logs
    from tfq.core.fileio import atomic_write_text

    quiet_logs()

    if FLAGS.sections:
        import os

        from benchmark_lib import int4_markdown, kinds_markdown, run_sections

        previous = None
        if os.path.exists(FLAGS.output):
            with open(FLAGS.output) as f:
                previous = json.load(f)
        results = run_sections(FLAGS.sections, previous, quick=FLAGS.quick)
        atomic_write_text(FLAGS.output, json.dumps(results, indent=1))
        for name, table in (("int4", int4_markdown), ("kinds", kinds_markdown)):
            if name in FLAGS.sections:
                print(table(results[name]))
        print(f"wrote {FLAGS.output}")
        return
    results = run_benchmark(FLAGS.models, num_threads=FLAGS.num_threads, quick=FLAGS.quick,
                            compression=FLAGS.compression, methods=FLAGS.methods, qat_cost=FLAGS.qat_cost,
                            qat_cost_rounds=FLAGS.qat_cost_rounds, qat_seeds=FLAGS.qat_seeds,
                            qat_variants=[{**({} if m == "unfolded" else {"bn_folding": m}),
                                           **({} if r == "tensor" else {"logits_range": r})}
                                          for m in FLAGS.qat_bn_folding for r in FLAGS.qat_logits_range],
                            calibration=FLAGS.calibration,
                            timing_repeats=FLAGS.timing_repeats)
    atomic_write_text(FLAGS.output, json.dumps(results, indent=1))
    table = to_markdown(results)
    print(table)
    if FLAGS.markdown:
        atomic_write_text(FLAGS.markdown, table + "\n")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    from tfq.cli.flags import run_script

    run_script(main, __doc__)
