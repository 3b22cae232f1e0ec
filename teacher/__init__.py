"""Teachers: pretrained code encoders, fine-tuned and judged offline, whose outputs
(candidate embeddings, soft labels) are precomputed into the store.

``workflow`` holds the teacher stage as functions of the settings (what the CLI,
the demo and the benchmarks call); ``commands`` the ``codistill teacher`` group.
"""
