"""Progress bars on stderr, only when stderr is a terminal (tqdm)."""

import contextlib
import sys

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(total, description, enabled=True):
    if not enabled or not sys.stderr.isatty():
        yield lambda count: None
        return
    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, leave=False) as bar:
        yield bar.update
