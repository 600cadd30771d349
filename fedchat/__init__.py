"""fedchat: privacy-focused federated fine-tuning of chat models."""

import os

__version__ = "0.1.0"

# Flower reads these when it is imported: no usage events to Flower's telemetry service and
# no update checks from any process fedchat starts (set them to opt back in).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
