"""``python -m student.online``: run one online trainer and print its summary as JSON.

The entry point the exactly-once tests launch (and SIGKILL) as a subprocess, so it
takes everything on the command line or from the environment: settings from
``CODISTILL_*`` / ``--config``, the trainer config as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import student.online
from codistill.config import OnlineTrainerConfig, load_settings
from student.online.trainer import run_online


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the trainer, print its summary.

    Parameters
    ----------
    argv
        Command-line arguments (default ``sys.argv[1:]``): ``--config FILE`` and
        ``--trainer JSON`` (or ``@FILE`` holding it).

    Returns
    -------
    int
        The exit status (0; errors raise).
    """
    doc = student.online.__doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m student.online",
                                     description=doc.split("\n")[0])
    parser.add_argument("--config", help="settings file (.yaml/.toml); else CODISTILL_CONFIG")
    parser.add_argument("--trainer", default="{}",
                        help="OnlineTrainerConfig as JSON, or @FILE holding it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raw = Path(args.trainer[1:]).read_text() if args.trainer.startswith("@") else args.trainer
    summary = run_online(load_settings(args.config), OnlineTrainerConfig.model_validate_json(raw))
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
