"""codistill: teacher-offline / student-online distillation for code ranking.

This package is two floors of the house. Its modules (``config``, ``ids``,
``ranking``, ``metrics``, ``fsio``, ``text``, ``console``) are the foundation:
they import no stage. ``codistill.app`` is the roof (the ``codistill`` command
and the demo): it composes the stages and nothing imports it. The stages sit
in between, top to bottom: ``serving`` > ``student`` > ``teacher`` >
{``stores``, ``streaming``, ``tasks``}; ``import-linter`` checks the order
(``pyproject.toml``, ``[tool.importlinter]``).
"""
