"""Serving: the student exported to ONNX behind ONNX Runtime, with Prometheus metrics.

Not built yet (the ONNX serving issue comes after the online half). What exists to
build on: ``student.export.onnx_export`` writes query / candidate encoder
graphs with dynamic axes, and ``stores`` serves candidate embeddings per pinned
teacher version.
"""
