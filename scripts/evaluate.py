"""Evaluate Keras and TFLite models through the interpreter (thin wrapper over ``tfq evaluate``).

    python scripts/evaluate.py --model=m.keras --tflite=a.tflite,b.tflite --data=test.npz [--output=r.json]
"""

from tfq.cli import commands as cli

if __name__ == "__main__":
    cli.run_command("evaluate", __doc__)
