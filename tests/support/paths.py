"""Where things are, for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
# fixture -> batch it is tested at (the LSTM only imports correctly at batch 1)
FIXTURE_MODELS = {"mlp.keras": 4, "mlp_legacy.h5": 4, "mlp_savedmodel": 4, "cnn_bn.keras": 4,
                  "text_cnn.keras": 4, "two_io.keras": 4, "lstm.keras": 1}
