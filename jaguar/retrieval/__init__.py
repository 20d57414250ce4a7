"""Retrieval stages after training, along the data flow: extraction (`extract`), post-processing
(`post/`: QE/DBA, k-reciprocal re-ranking, the dense/top-M search decision, tune-post), local pattern
matching (`local/`), the outputs (`submission`, `score`, `rank`), open-set identification
(`openset/`), diagnostics (`diagnose`), export (`export`) and the report's figures (`split_figures`).
Below it: jaguar.core (features, evaluator, kNN, embedding); it never imports jaguar.train."""
