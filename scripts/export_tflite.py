"""Export a Keras model to TFLite (thin wrapper over ``tfq convert``).

    python scripts/export_tflite.py --model=m.keras --mode=int8 --data=calib.npz --calibration=kl \
        --output=m.tflite
"""

from tfq.cli import commands as cli

if __name__ == "__main__":
    cli.run_command("convert", __doc__)
