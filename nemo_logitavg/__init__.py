"""nemo-logitavg: logit-averaging GRPO on Megatron-Core."""

__version__ = "0.1.0"
