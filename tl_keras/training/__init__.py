"""Training: the recipe, the two phases and the self-training rounds, what a run
records to resume, the learning-rate range test, where it runs, and its TensorBoard log.

Imports `outputs` (validation reports, figures), `model`, `data` and the shared modules.
"""
