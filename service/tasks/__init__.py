"""One handler per task: validated parameters + decoded images -> batch items; model outputs -> the answer.

Every protocol (the REST API here, and any other that serves the same tasks) calls the same handlers, so
a task's rules (masking, top-k, normalisation of embeddings) live in one place.
"""
from .base import BatchWork, PreparedImage, TaskHandler
from .classify import ClassifyHandler
from .embed import EmbedHandler
from .reconstruct import ReconstructHandler

HANDLERS: dict[str, TaskHandler] = {h.task: h for h in (ClassifyHandler(), EmbedHandler(), ReconstructHandler())}

__all__ = ["HANDLERS", "BatchWork", "PreparedImage", "ClassifyHandler", "EmbedHandler", "ReconstructHandler", "TaskHandler"]
