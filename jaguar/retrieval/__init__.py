"""Retrieval: feature extraction, query expansion, re-ranking, metrics, submissions."""
