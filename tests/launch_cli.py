"""``gradproj`` for torchrun in tests (exits like ``python -m gradproj.cli``)."""

import os
import sys

from gradproj.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo's threads sometimes abort there after a clean run
