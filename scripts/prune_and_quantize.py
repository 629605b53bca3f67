"""Prune a trained Keras model while fine-tuning it, then export it as a full-integer TFLite model.

    python scripts/prune_and_quantize.py --model=float.keras --data=train.npz [--eval_data=val.npz] \
        --target_sparsity=0.75 --epochs=4 --qat_epochs=1 --output=pruned_int8.tflite

Without --model, trains the example digits CNN on the packaged digits first. Prints the sparsity
reached, the raw and gzip-compressed sizes and, with --eval_data, the accuracies.
"""

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained float Keras model (.keras). Default: train the digits CNN.")
flags.DEFINE_string("data", None, ".npz with 'x' and 'y' (training data). Default: packaged digits.")
flags.DEFINE_string("eval_data", None, ".npz with 'x' and 'y' for the accuracies.")
flags.DEFINE_string("output", "pruned_int8.tflite", "Where to write the INT8 .tflite.")
flags.DEFINE_string("save_keras", None, "Optional path for the pruned (stripped) float .keras model.")
flags.DEFINE_float("target_sparsity", 0.75, "Share of zeros in each pruned weight, in [0, 1).")
flags.DEFINE_enum("schedule", "polynomial", ["polynomial", "constant"], "Sparsity schedule.")
flags.DEFINE_integer("epochs", 4, "Pruning fine-tuning epochs.")
flags.DEFINE_float("end_fraction", 0.6, "Share of the pruning steps after which the target sparsity holds.")
flags.DEFINE_integer("frequency", 10, "Steps between mask updates.")
flags.DEFINE_list("block_size", ["1", "1"], "Rows,cols of weights pruned together.")
flags.DEFINE_list("skip_layers", [], "Layers left dense (names, regexes or class:Name).")
flags.DEFINE_integer("qat_epochs", 1, "Sparsity-preserving QAT epochs (0: post-training quantization).")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate while pruning.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    del argv
    import sys

    from absl import app

    from tfq.cli.flags import load_npz, quiet_logs
    from tfq.training import prune_and_quantize

    quiet_logs()

    if FLAGS.model:
        from tfq.models.loading import load_model

        model = load_model(FLAGS.model)
        x, y = load_npz(FLAGS.data, "data", need_labels=True)
        x_val, y_val = load_npz(FLAGS.eval_data, "eval_data", need_labels=True) if FLAGS.eval_data else (None, None)
    else:
        from tfq.examples import train_digits_cnn

        model, (x, y), (x_val, y_val) = train_digits_cnn(epochs=10, seed=FLAGS.seed)
    try:
        block_size = tuple(int(v) for v in FLAGS.block_size)
    except ValueError:
        raise app.UsageError(f"--block_size must be two integers, e.g. 1,4. Received: {FLAGS.block_size}") from None
    try:
        pruned, content, summary = prune_and_quantize(
            model, x, y, x_val=x_val, y_val=y_val, target_sparsity=FLAGS.target_sparsity, schedule=FLAGS.schedule,
            epochs=FLAGS.epochs, end_fraction=FLAGS.end_fraction, frequency=FLAGS.frequency, block_size=block_size,
            skip_layers=FLAGS.skip_layers, qat_epochs=FLAGS.qat_epochs, learning_rate=FLAGS.learning_rate,
            output=FLAGS.output, seed=FLAGS.seed)
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad input: one line, no output file
        print(f"prune_and_quantize: {err}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.save_keras:
        pruned.save(FLAGS.save_keras)
    print(f"sparsity: {100 * summary['sparsity']['total']:.1f}% of the pruned weights "
          f"({100 * summary['int8_weight_sparsity']:.1f}% of the INT8 weights)")
    print(f"size: {summary['size']:,} bytes; gzip: {summary['gzip_size']:,} bytes")
    if "int8_accuracy" in summary:
        print(f"accuracy: float {summary['float_accuracy']:.4f}; pruned float {summary['pruned_accuracy']:.4f}; "
              f"pruned INT8 {summary['int8_accuracy']:.4f}")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    from tfq.cli.flags import run_script

    run_script(main, __doc__)
