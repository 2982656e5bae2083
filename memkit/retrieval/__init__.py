"""memkit's retrieval: a pipeline of registered stages per step, configured under one ``retrieval:`` block.

See :mod:`memkit.retrieval.pipeline` (the pipeline and what flows through it), :mod:`memkit.retrieval.stage` (the
stage registry) and :mod:`memkit.retrieval.config` (the config block and the memkit 0.2 keys it replaces).
"""

from memkit.retrieval.config import LEGACY_KEYS, RetrievalConfig, migrate_legacy_retrieval
from memkit.retrieval.pipeline import Candidates, Pipeline, Reader, Reread, Row, RowRequest, StepContext
from memkit.retrieval.stage import PHASES, STAGES, STEPS, Stage, StageConfig, register_stage

__all__ = ["RetrievalConfig", "LEGACY_KEYS", "migrate_legacy_retrieval", "Pipeline", "Row", "RowRequest", "Candidates",
           "StepContext", "Reader", "Reread", "Stage", "StageConfig", "STAGES", "STEPS", "PHASES", "register_stage"]
