"""Inference: face detection, the protocol crop, prediction on images and video, ONNX export.

Submodules import their heavy dependencies (opencv, onnx, onnxruntime) inside functions.
"""
