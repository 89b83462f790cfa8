"""The server's speaker registry: cached voices by id, persisted in a directory replicas can share.

A voice is what ``CosyVoice3.add_zero_shot_spk`` caches (prompt features + transcript ids), written
by ``CosyVoice3.save_spkinfo``'s format: ``<id>.npz`` then ``<id>.json``, each replaced atomically
(temp file + rename), so a reader sees a voice only once both files are complete (``load_spkinfo``
keys on the ``.json``).  Several server replicas may share the directory: an id one of them does not
hold in memory is looked up there again before it is refused.

Ids are 1-64 characters of ``A-Z a-z 0-9 _ -`` starting with a letter or digit: never a path
separator, a dot or ``..``, so an id is its own file name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import types
import uuid
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SPK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class SpeakerExists(ValueError):
    """Registering an id that is already taken (the server answers 409)."""


def check_spk_id(spk_id: Any, field: str = "spk_id") -> str:
    """``spk_id`` if it is a valid id, else ``ValueError`` naming ``field``."""
    if not isinstance(spk_id, str) or not SPK_ID.fullmatch(spk_id):
        raise ValueError(f"{field}={spk_id!r}: a speaker id is 1-64 letters, digits, '_' or '-' (starting with a "
                         "letter or digit; no '/', '.' or other path characters)")
    return spk_id


class SpeakerRegistry:
    """Voices of one ``CosyVoice3`` (its ``spk2info``), optionally persisted in ``directory``.

    Args:
      model: the pipeline whose ``spk2info`` holds the voices in memory.
      directory: where voices are saved and looked up (created if missing); None: memory only.
    """

    def __init__(self, model: Any, directory: str | None = None):
        self.model = model
        self.directory = os.path.abspath(directory) if directory else None
        self._lock = threading.Lock()
        self._adding: set[str] = set()
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)

    @property
    def _memory(self) -> dict[str, Any]:
        return getattr(self.model, "spk2info", {})

    def ids(self) -> list[str]:
        """Every id in memory or in the directory."""
        found = set(self._memory)
        if self.directory:
            for name in os.listdir(self.directory):
                if name.endswith(".json") and not name.startswith(".") and SPK_ID.fullmatch(name[:-5]):
                    found.add(name[:-5])
        return sorted(found)

    def has(self, spk_id: str) -> bool:
        """Whether ``spk_id`` is usable now; loads it from the directory if another replica saved it."""
        if spk_id in self._memory:
            return True
        return bool(SPK_ID.fullmatch(spk_id or "")) and self._load(spk_id)

    def _load(self, spk_id: str) -> bool:
        if not self.directory:
            return False
        meta_path = os.path.join(self.directory, spk_id + ".json")
        if not os.path.isfile(meta_path):
            return False
        from cosyjax.frontend import PromptFeatures

        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("id") != spk_id:  # a file saved under another id's sanitised name
            return False
        prompt = PromptFeatures.load(os.path.join(self.directory, spk_id + ".npz"))
        with self._lock:
            self._memory.setdefault(spk_id, {"prompt": prompt,
                                             "prompt_text_ids": np.asarray(meta["prompt_text_ids"], np.int64)})
        log.info("speaker %s loaded from %s", spk_id, self.directory)
        return True

    def add(self, prompt_text: str, prompt_wav: Any, spk_id: str | None = None) -> str:
        """Extract and cache a voice (``add_zero_shot_spk``), then save it to the directory.

        Returns:
          The id (a new random one when ``spk_id`` is empty).
        Raises:
          ValueError: a bad id, transcript or recording (the pipeline's message).
          SpeakerExists: the id is taken (in memory, in the directory, or being added).
        """
        spk_id = check_spk_id(spk_id) if spk_id else "spk-" + uuid.uuid4().hex[:12]
        with self._lock:
            taken = spk_id in self._memory or spk_id in self._adding or (
                self.directory is not None and os.path.exists(os.path.join(self.directory, spk_id + ".json")))
            if taken:
                raise SpeakerExists(f"spk_id={spk_id!r} is already registered (choose another id)")
            self._adding.add(spk_id)
        try:
            self.model.add_zero_shot_spk(prompt_text, prompt_wav, spk_id)
            if self.directory:
                self._save(spk_id)
        except BaseException:
            self._memory.pop(spk_id, None)
            raise
        finally:
            with self._lock:
                self._adding.discard(spk_id)
        return spk_id

    def _save(self, spk_id: str) -> None:
        # save_spkinfo writes every voice of its pipeline; called on a view holding only this voice it
        # writes just the new files (npz first, json last, each atomically).
        one = types.SimpleNamespace(spk2info={spk_id: self._memory[spk_id]}, model_dir=self.directory)
        type(self.model).save_spkinfo(one, self.directory)
        log.info("speaker %s saved to %s", spk_id, self.directory)


__all__ = ["SPK_ID", "SpeakerExists", "SpeakerRegistry", "check_spk_id"]
