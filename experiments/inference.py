"""Run an inference config: `python experiments/inference.py configs/inference/tiny.yaml [key.sub=value ...]`."""

import sys

from gptoss.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
