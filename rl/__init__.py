"""rl: post-training (RL, DPO, SFT) for LoRA language models on Ray, speaking the Tinker API."""

__version__ = "0.1.0"
