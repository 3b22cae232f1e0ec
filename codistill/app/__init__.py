"""The top floor: the ``codistill`` command (:mod:`codistill.app.cli`) and the demo.

It composes the stages' command modules and runs them end to end; nothing in the
project imports it.
"""
