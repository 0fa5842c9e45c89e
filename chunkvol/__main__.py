"""`python -m chunkvol ...` is the `chunkvol` command (serve starts its shipper this way)."""

import sys

from chunkvol.cli.main import main

sys.exit(main())
