"""``python -m devstack [--dir .dev-stack]``: the local stack (``make dev``)."""

import argparse
import sys
from pathlib import Path

from devstack.stack import run_dev_stack

parser = argparse.ArgumentParser(prog="python -m devstack", description=run_dev_stack.__doc__)
parser.add_argument(
    "--dir", type=Path, default=Path(".dev-stack"), help="state folder (default: .dev-stack)"
)
sys.exit(run_dev_stack(parser.parse_args().dir))
