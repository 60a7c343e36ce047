"""``python -m dicomflow.repack``: the repack command."""

import sys

from dicomflow.repack.cli import main

sys.exit(main())
