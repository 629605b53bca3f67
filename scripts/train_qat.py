"""Quantization-aware fine-tuning of a trained Keras model, exported to full-integer TFLite.

    python scripts/train_qat.py --model=float.keras --data=train.npz [--eval_data=val.npz] \
        --epochs=3 --output_dir=qat_out

Without --model, trains the example digits CNN on the packaged digits first.

On several machines, run the same command on every worker with --strategy=multi_worker and the
worker's TF_CONFIG (see README, "Multi-worker QAT"); --batch_size is the global batch.
"""

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained float Keras model (.keras). Default: train the digits CNN.")
flags.DEFINE_string("data", None, ".npz with 'x' and 'y' (training data). Default: packaged digits.")
flags.DEFINE_string("eval_data", None, ".npz with 'x' and 'y': INT8 accuracy logged per epoch.")
flags.DEFINE_integer("epochs", 3, "QAT epochs.")
flags.DEFINE_integer("batch_size", 32, "Batch size (global under a strategy).")
flags.DEFINE_float("learning_rate", 2e-4, "Adam learning rate.")
flags.DEFINE_integer("freeze_bn_epoch", 1, "Freeze BatchNorm statistics after this epoch.")
flags.DEFINE_enum("bn_folding", "unfolded", ["unfolded", "two_pass"],
                  "How folded BatchNorms train before the freeze (see tfq.qat.quantize_model).")
flags.DEFINE_enum("logits_range", "tensor", ["tensor", "softmax"],
                  "Range of the quantizer on a softmax's input (see tfq.qat.quantize_model).")
flags.DEFINE_enum("strategy", "none", ["none", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy: none, mirrored (local devices), multi_worker (TF_CONFIG) or tpu "
                  "(TPUStrategy; see README).")
flags.DEFINE_string("tpu", "", "With --strategy=tpu: the TPU name or address ('' = this TPU VM / pod slice).")
flags.DEFINE_string("output_dir", "qat_out", "Output directory (other workers than the chief write to a subdirectory).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def _check_flags():
    """Refuses, in one line, values train_qat would misread (a negative epoch count trains nothing and still
    writes a model)."""
    from tfq.cli.flags import UsageError

    for name, low in (("epochs", 1), ("batch_size", 1), ("freeze_bn_epoch", 0)):
        if FLAGS[name].value < low:
            raise UsageError(f"Expected --{name} >= {low}. Received: --{name}={FLAGS[name].value}")
    if not FLAGS.learning_rate > 0:
        raise UsageError(f"Expected --learning_rate > 0. Received: --learning_rate={FLAGS.learning_rate}")


def main(argv):
    del argv
    _check_flags()
    from tfq.training import make_strategy, train_qat, worker_output_dir

    strategy = make_strategy(FLAGS.strategy, FLAGS.tpu)  # first: MultiWorkerMirroredStrategy needs it
    from tfq.cli.flags import load_npz, quiet_logs

    quiet_logs()

    if FLAGS.model:
        from tfq.models.loading import load_model

        model = load_model(FLAGS.model)
        x, y = load_npz(FLAGS.data, "data", need_labels=True)
        x_val, y_val = load_npz(FLAGS.eval_data, "eval_data", need_labels=True) if FLAGS.eval_data else (None, None)
    else:
        from tfq.examples import train_digits_cnn

        model, (x, y), (x_val, y_val) = train_digits_cnn(epochs=10, seed=FLAGS.seed)
    _, content, _ = train_qat(model, x, y, x_val=x_val, y_val=y_val, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                              learning_rate=FLAGS.learning_rate, freeze_bn_epoch=FLAGS.freeze_bn_epoch,
                              output_dir=FLAGS.output_dir, seed=FLAGS.seed, strategy=strategy,
                              bn_folding=FLAGS.bn_folding, logits_range=FLAGS.logits_range)
    out = worker_output_dir(FLAGS.output_dir, strategy)
    print(f"wrote {out}/qat_int8.tflite ({len(content):,} bytes) and qat.keras")


if __name__ == "__main__":
    from tfq.cli.flags import run_script

    run_script(main, __doc__)
