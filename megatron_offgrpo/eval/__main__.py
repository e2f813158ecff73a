"""``python -m megatron_offgrpo.eval``: see :mod:`megatron_offgrpo.eval.cli`."""

import sys

from megatron_offgrpo.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
