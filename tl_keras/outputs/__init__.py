"""Outputs: what a trained classifier gives: test metrics and the per-class report,
figures, Grad-CAM heatmaps, the exported files, and predictions with them.

Imports `model`, `data` and the shared modules.
"""
