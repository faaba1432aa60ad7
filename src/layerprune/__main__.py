"""`python -m layerprune` (and `torchrun ... -m layerprune`): the command line."""

import sys

from .cli import main

sys.exit(main())
