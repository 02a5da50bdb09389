"""``python -m benchmarks``: see :mod:`benchmarks.bench`; ``python -m benchmarks heads``: see :mod:`benchmarks.heads`."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "heads":
    from .heads import main as heads_main

    sys.exit(heads_main(sys.argv[2:]))

from .bench import main

sys.exit(main())
