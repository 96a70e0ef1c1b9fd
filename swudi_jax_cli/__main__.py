"""``python -m swudi_jax_cli``: the ``swudi-merge`` command."""

import sys

from swudi_jax_cli import main

sys.exit(main())
