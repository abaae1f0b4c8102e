"""Task metrics computed the way their fields publish them (BLEU by sacrebleu, with its signature).

sacrebleu comes with the `espnet` extra; a metric that needs a missing package says which extra
installs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deploykit.core.errors import UsageError
from deploykit.core.extras import require


@dataclass(frozen=True)
class BleuScore:
    """Corpus BLEU, 0..100, and sacrebleu's signature of how it was computed (tokenizer, smoothing,
    version): two scores are comparable only when their signatures are equal."""

    score: float
    signature: str


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuScore:
    """Corpus BLEU of detokenized sentences against one reference each, by sacrebleu with its
    defaults (4-gram, 13a tokenizer, exponential smoothing): the way published speech-translation
    BLEU is computed, so scores here can be set beside the study's."""
    BLEU = require("sacrebleu.metrics", "BLEU").BLEU

    if len(hypotheses) != len(references):
        raise UsageError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return BleuScore(float(score.score), str(metric.get_signature()))
