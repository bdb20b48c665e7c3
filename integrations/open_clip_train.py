"""open_clip's training script with GloFND.

``python integrations/open_clip_train.py <open_clip_train flags> --glofnd-...``: every flag of
``python -m open_clip_train.main`` works unchanged; the ``--glofnd-*`` flags
(``--help`` lists them) configure :class:`glofnd_losses.GloFNDClipLoss`, which replaces open_clip's
loss. See :mod:`glofnd_losses.integrations.open_clip` for what is patched and docs/open_clip.md
for launch commands (torchrun, accelerate, several nodes).
"""

from __future__ import annotations

import os
import sys

# This file is called open_clip_train.py: drop its own folder from the import path, or
# `import open_clip_train` would import this script instead of open_clip's package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

import open_clip_train.main  # noqa: E402

from glofnd_losses.integrations.open_clip import patch_open_clip_train  # noqa: E402


def main(argv: list[str]) -> int:
    """Run open_clip_train's ``main`` with the GloFND patches; return the exit status.

    A bare ``--`` in ``argv`` is dropped: ``torchrun ... open_clip_train.py -- --logs DIR`` keeps
    torchrun's own parser from claiming ``--logs`` (an abbreviation of its ``--logs-specs``).
    """
    if "--" in argv:
        argv = argv[: argv.index("--")] + argv[argv.index("--") + 1 :]
    with patch_open_clip_train():
        status = open_clip_train.main.main(argv)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
