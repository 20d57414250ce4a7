"""Training: the trainer loop, optimisation, validation during training, checkpoint writing and
resume, distillation, preemption and logging to TensorBoard. Below it: jaguar.core (run split,
accelerator, evaluator, embedding); it never imports jaguar.retrieval."""
