"""Adapters that plug the GloFND losses into other projects' training code.

Each adapter is a module of its own and imports its host project only when imported itself:

* :mod:`glofnd_losses.integrations.open_clip`: open_clip's training script (``open_clip_train``),
  also as ``python -m glofnd_losses.integrations.open_clip``; needs
  ``pip install glofnd-losses[open_clip]``.
* :mod:`glofnd_losses.integrations.lightly`: ``WithIndex`` and the PyTorch Lightning callback;
  needs ``pip install glofnd-losses[lightly]``.
"""
