"""``lightning-ctx ui``: ``mlflow ui`` on this folder's store, after re-rooting a moved or copied one."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from lightning_ctx.console import PlainHelpFormatter
from lightning_ctx.tracking import open_store


def ui_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="lightning-ctx ui", formatter_class=PlainHelpFormatter,
        description="Open the MLflow UI on the runs of this folder (mlflow ui --backend-store-uri ...), after "
                    "pointing the artifact locations of a moved or copied store at its folder. Every other flag "
                    "(--host, --port, ...) goes to mlflow ui.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns/mlflow.db)")
    args, rest = p.parse_known_args(argv)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", open_store(args.tracking_uri), *rest]
    print(" ".join(command[1:]), flush=True)
    os.execv(sys.executable, command)  # replaces this process: Ctrl-C stops the UI itself
    return 0  # not reached
