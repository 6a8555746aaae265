"""``python -m harmon.cli`` (as ``torchrun ... -m harmon.cli train CONFIG`` runs it): the ``harmon`` command."""
import sys

from . import main

sys.exit(main())
