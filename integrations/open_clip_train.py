"""open_clip's training script with GloFND, from a checkout of this repository.

``python integrations/open_clip_train.py <open_clip_train flags> --glofnd-...`` is
``python -m glofnd_losses.integrations.open_clip ...``: the same entry point
(:func:`glofnd_losses.integrations.open_clip.cli.main`). See
:mod:`glofnd_losses.integrations.open_clip` for what is patched and docs/open_clip.md for launch
commands (torchrun, accelerate, several nodes).
"""

from __future__ import annotations

import os
import sys

# This file is called open_clip_train.py: drop its own folder from the import path, or
# `import open_clip_train` would import this script instead of open_clip's package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

from glofnd_losses.integrations.open_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
