"""Training: losses, LoRA adapters, the optimizer and a jitted train step."""

from gptoss.train.export import export_pretrained
from gptoss.train.lora import LoraConfig, add_lora, load_adapters, lora_params, merge_lora, save_adapters
from gptoss.train.loss import cross_entropy_sum, expert_load, load_balancing_loss, router_z_loss
from gptoss.train.step import LossConfig, OptimConfig, Trainer, TrainState, loss_and_metrics, make_optimizer

__all__ = ["LossConfig", "LoraConfig", "OptimConfig", "TrainState", "Trainer", "add_lora", "cross_entropy_sum",
           "expert_load", "export_pretrained", "load_adapters", "load_balancing_loss", "lora_params",
           "loss_and_metrics", "make_optimizer", "merge_lora", "router_z_loss", "save_adapters"]
