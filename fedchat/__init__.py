"""fedchat: privacy-focused federated fine-tuning of chat models."""

__version__ = "0.1.0"
