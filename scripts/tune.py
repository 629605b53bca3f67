"""Accuracy-aware tuning (thin wrapper over ``tfq tune``).

    python scripts/tune.py --model=m.keras --data=calib.npz --eval_data=val.npz --max_drop=0.005 --output_dir=out
"""

from tfq.cli import commands as cli

if __name__ == "__main__":
    cli.run_command("tune", __doc__)
