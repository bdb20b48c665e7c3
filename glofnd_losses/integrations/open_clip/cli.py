"""The command line: open_clip's training script with GloFND.

``python -m glofnd_losses.integrations.open_clip <open_clip_train flags> --glofnd-...``: every flag
of ``python -m open_clip_train.main`` works unchanged; the ``--glofnd-*`` flags (``--help`` lists
them) configure :class:`~glofnd_losses.GloFNDClipLoss` (with ``--siglip``,
:class:`~glofnd_losses.GloFNDSigLipLoss`), which replaces open_clip's loss.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import open_clip_train.main

from glofnd_losses.integrations.open_clip.patches import patch_open_clip_train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run open_clip_train's ``main`` with the GloFND patches; return the exit status.

    A bare ``--`` in ``argv`` is dropped: ``torchrun ... -- --logs DIR`` keeps torchrun's own
    parser from claiming ``--logs`` (an abbreviation of its ``--logs-specs``).

    Args:
        argv: The command-line arguments, without the program name (default: ``sys.argv[1:]``).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--" in arguments:
        arguments = arguments[: arguments.index("--")] + arguments[arguments.index("--") + 1 :]
    with patch_open_clip_train():
        status = open_clip_train.main.main(arguments)
    return int(status or 0)
