"""``python -m reft_edge.cli``: the ``reft-edge`` command without its script (the runtime starts
``serve-web`` this way, tests and benchmarks start ``serve`` and ``train``)."""

import sys

from reft_edge.cli import main

sys.exit(main())
