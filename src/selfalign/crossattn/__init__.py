"""Cross-attention scoring baselines (SCAN) used as slow, fine-grained re-rankers."""

from selfalign.crossattn.scan import SCANScorer, scan_t2i_scores

__all__ = ["SCANScorer", "scan_t2i_scores"]
