"""Applications on top of the engine: the config-driven jobs that `gptoss run` and `experiments/` start."""
