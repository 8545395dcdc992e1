"""xtuner-vl: config-driven fine-tuning of InternVL 1.5 / 2 models."""

__version__ = "0.1.0"
