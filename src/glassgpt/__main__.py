"""`python -m glassgpt VERB ...`: the `glassgpt` command, for launchers that start a module.

    torchrun --standalone --nproc_per_node 2 -m glassgpt train --recipe verdict --out runs/verdict-ddp
"""

import sys

from glassgpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
