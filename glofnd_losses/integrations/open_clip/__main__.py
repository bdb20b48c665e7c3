"""``python -m glofnd_losses.integrations.open_clip``: see :mod:`glofnd_losses.integrations.open_clip.cli`."""

import sys

from glofnd_losses.integrations.open_clip.cli import main

if __name__ == "__main__":
    sys.exit(main())
