"""Model: the backbones by name, the classifier built on one, its blocks for
layer-wise decay, and its features cached for the head phase.

Imports `data` and the shared modules.
"""
