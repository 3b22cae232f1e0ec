"""``codistill experiment online``: the closed loop, measured.

Users (``streaming.simulator``) send queries of the ``online`` split, which no split the
teacher or student trained on contains; every arm ranks them, is scored against the
users' true relevance before it learns (progressive validation), and the learning arms
learn from their own impressions only: KD from the teacher's nearline labels, clicks,
or both. ``run`` is one seeded stream, ``report`` the curves, intervals and targets,
``commands`` the CLI that prepares the home, labels the online split and writes the
JSON and the figure under ``benchmarks/results/``.
"""
