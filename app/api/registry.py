"""The models this process serves, their OpenAI alias, and the service's lifecycle phase."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from app.constants import OPENAI_ALIAS
from app.errors import ModelNotFoundError

if TYPE_CHECKING:
    from app.runtime import Runtime


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class ServedModel:
    name: str
    runtime: Runtime
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def multilingual(self) -> bool:
        return bool(self.runtime.config.multilingual)

    @property
    def languages(self) -> frozenset[str]:
        """Language codes the model's vocabulary has tokens for (empty for English-only models)."""
        return frozenset(self.runtime.config.special_tokens.languages)


class ModelRegistry:
    def __init__(self, default_model: str) -> None:
        self.default_model = default_model
        self.phase = Phase.STARTING
        self._models: dict[str, ServedModel] = {}

    def add(self, name: str, runtime: Runtime) -> None:
        self._models[name] = ServedModel(name, runtime)

    def resolve(self, name: str | None) -> ServedModel:
        """The served model for a request's `model` field; None and whisper-1 mean the default."""
        if not name or name == OPENAI_ALIAS:
            name = self.default_model
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(name)
        return model

    def ids(self) -> list[str]:
        """Every id a client may send, the alias last (it is what OpenAI clients default to)."""
        names = list(self._models)
        return [*names, OPENAI_ALIAS] if self.default_model in self._models else names

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY
