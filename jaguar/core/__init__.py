"""The shared layer under training and retrieval: feature sets, the evaluator (dense and ranked)
with the kNN it needs, batch embedding and contiguous slicing, the run split, the accelerator set-up
and inference weight loading. It imports nothing from jaguar.train or jaguar.retrieval."""
