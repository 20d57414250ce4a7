"""jaguar: distributed training and retrieval for individual-animal re-identification."""
