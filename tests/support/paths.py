"""Where things are, for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
# well-conditioned fixture -> batch it is tested at (CNTK imports LSTMs correctly at batch 1 only)
FIXTURE_MODELS = {"mlp.keras": 4, "mlp_legacy.h5": 4, "mlp_savedmodel": 4, "cnn_bn.keras": 4,
                  "text_cnn.keras": 4, "two_io.keras": 4, "lstm.keras": 1, "lstm_textgen.keras": 1}
# ill-conditioned ones: TF32 itself is 1e-5..1e-2 from the float64 truth (fixtures/README.md)
ILL_CONDITIONED = {"spectrogram_cnn.keras": 1, "lstm_chaos.keras": 1}
