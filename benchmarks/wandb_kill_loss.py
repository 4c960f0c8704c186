"""How many W&B history rows a SIGKILL loses, with W&B's default file flush and with lit_reason's.

Each trial is a child process that logs one row every ``--interval`` seconds to an offline W&B run,
then SIGKILLs itself; the table counts the rows found in its ``run-*.wandb`` file.

    python benchmarks/wandb_kill_loss.py [--rows 20 --interval 0.25]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import os, signal, sys, time, wandb
run = wandb.init(mode="offline", project="kill-loss", dir=sys.argv[1])
for i in range(int(sys.argv[2])):
    run.log({"x": i})
    time.sleep(float(sys.argv[3]))
os.kill(os.getpid(), signal.SIGKILL)
"""


def trial(flush: str | None, rows: int, interval: float) -> int:
    from lit_reason.wandb_history import history

    env = {k: v for k, v in os.environ.items() if k != "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"}
    if flush is not None:
        env["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = flush
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", CHILD, tmp, str(rows), str(interval)], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return sum(len(history(f)) for f in Path(tmp).glob("wandb/offline-run-*/run-*.wandb"))


def main() -> None:
    from lit_reason.cli import WANDB_FLUSH_SECONDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between rows")
    args = parser.parse_args()
    print("| file flush | rows logged | rows in the file after SIGKILL |")
    print("| --- | --- | --- |")
    for label, flush in (("W&B default (15 s)", None), (f"lit_reason CLI ({WANDB_FLUSH_SECONDS} s)", WANDB_FLUSH_SECONDS)):
        print(f"| {label} | {args.rows} | {trial(flush, args.rows, args.interval)} |", flush=True)


if __name__ == "__main__":
    main()
