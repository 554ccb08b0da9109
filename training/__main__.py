"""`python -m training JOB ...` and `torchrun ... -m training JOB ...`: the same command as `deepserve train`."""

import sys

from training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
