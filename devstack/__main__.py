"""``python -m devstack [--dir .dev-stack] [--ha] [--postgres]``: the local stack (``make dev``)."""

import argparse
import sys
from pathlib import Path

from devstack.stack import run_dev_stack

parser = argparse.ArgumentParser(prog="python -m devstack", description=run_dev_stack.__doc__)
parser.add_argument(
    "--dir", type=Path, default=Path(".dev-stack"), help="state folder (default: .dev-stack)"
)
parser.add_argument(
    "--ha",
    action="store_true",
    help="a 3-node OpenBao raft cluster and two broker replicas instead of one of each",
)
parser.add_argument(
    "--postgres",
    action="store_true",
    help="the catalog on PostgreSQL, its users issued by OpenBao's database engine",
)
arguments = parser.parse_args()
sys.exit(run_dev_stack(arguments.dir, ha=arguments.ha, postgres=arguments.postgres))
