"""jaguar: distributed training and retrieval for individual-animal re-identification."""

__version__ = "0.1.0"
