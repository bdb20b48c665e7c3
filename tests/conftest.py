import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402  (after the path set-up above)


@pytest.fixture(params=["reductions", "topk"])
def straddling_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the CPU path finds the quantile of anchors next to it, forced either way for the test.

    ``"reductions"``: two masked reductions (``functional.SHORT_TOPK = 0``); ``"topk"``: the short
    ``topk`` whatever its length.
    """
    from glofnd_losses import functional

    way: str = request.param
    monkeypatch.setattr(functional, "SHORT_TOPK", 0 if way == "reductions" else 10**9)
    return way
