import logging
import os
import sys

from chop.cli import main

main()
if sys.argv[1:2] == ["eval"]:
    # chop eval has written all it writes and leaves no process or file behind: skip the interpreter's teardown of
    # torch and transformers, a second or more of every evaluation's end to end (lm-eval pays it too).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
