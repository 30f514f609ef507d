"""geocap.study: train, evaluate, dump and analyse every (variant, seed) of a study and summarise
them with intervals and verdicts (``geocap study``). The aggregation's interface: :class:`ModelResult`,
:func:`summarize`, :func:`write_report` (:mod:`.summary`)."""
from .summary import ModelResult, summarize, write_report

__all__ = ["ModelResult", "summarize", "write_report"]
