"""Run a training config: `python experiments/train.py configs/finetune/tiny-lora.yaml [key.sub=value ...]`
(LoRA or full training; resumes from the run folder's latest checkpoint)."""

import sys

from gptoss.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
