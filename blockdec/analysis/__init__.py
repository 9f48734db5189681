"""Diagnostics of drafts and heads (may use models; decoding never imports this)."""

from blockdec.analysis.drafts import (draft_statistics, head_predictions,
                                      plot_draft_statistics)
