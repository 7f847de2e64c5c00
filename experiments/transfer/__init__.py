"""The parts of the CIFAR-10 transfer experiment, which
`experiments/cifar10_transfer.py` runs: `arms` (what each run trains),
`runner` (running them once each) and `report` (the tables).
"""

import os

# The repository's root, where run.py and the tl_keras package are.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
