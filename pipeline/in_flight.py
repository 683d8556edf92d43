"""Which images a worker had in hand when its process died, kept across Ray's retries.

Ray Data restarts a dead actor and retries its call without end, and retries a task whose
process died without end too. An image that kills the process every time (out of memory, a
crash in a native decoder or kernel) would therefore stall a run forever. Each inference
actor writes the image ids of the model batch it is working on to a small file on its node
before it starts on them, and clears it when done; each decode task (GPU clusters) does so
for the images it reads and decodes together. A restarted actor (same actor id) or a
retried task (same task id) reads what its previous process left: those images were in
hand when it died. It then puts each of them through alone, recording each alone, so a
later death names one image; an image whose process died `MAX_DEATHS_ALONE` times while it
was alone becomes an error row instead of being tried again.

The file lives in Ray's session directory on the node, so a restart on another node (after
a node loss, which is no image's fault) starts without history; a task retried on another
node is found out once a retry lands where an earlier attempt died. One file per actor is
enough because an actor runs one call at a time (Ray's default `max_concurrency` of 1,
which the pipeline keeps).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# One death alone could be the memory monitor choosing this worker for another process's
# excess; two are the image's own doing.
MAX_DEATHS_ALONE = 2


@dataclass
class Deaths:
    """How often a worker's process died while an image was in hand: with others, alone."""

    with_others: int = 0
    alone: int = 0


@dataclass
class InFlightRecord:
    """One actor's or task's record of the images in hand, in `path` (JSON), and of past deaths.

    deaths: image id → its deaths so far, for images not finished since.
    """

    path: str
    deaths: dict[str, Deaths] = field(default_factory=dict)

    @classmethod
    def for_current_actor(cls) -> InFlightRecord | None:
        """The record of the Ray actor this runs in (None outside an actor), with the deaths
        its earlier processes left behind."""
        import ray

        return cls._for_worker(ray.get_runtime_context().get_actor_id())

    @classmethod
    def for_current_task(cls) -> InFlightRecord | None:
        """The record of the Ray task this runs in (None outside a task), with the deaths its
        earlier attempts on this node left behind: a retried task keeps its task id."""
        import ray

        context = ray.get_runtime_context()
        return None if context.get_actor_id() is not None else cls._for_worker(context.get_task_id())

    @classmethod
    def _for_worker(cls, worker_key: str | None) -> InFlightRecord | None:
        import ray

        if worker_key is None:
            return None
        context = ray.get_runtime_context()
        directory = os.path.join(context.get_temp_dir(), context.get_session_name(), "rayseg-in-flight")
        os.makedirs(directory, exist_ok=True)
        return cls.load(os.path.join(directory, f"{worker_key}.json"))

    @classmethod
    def load(cls, path: str) -> InFlightRecord:
        """The record at `path`; images a dead process left in hand get one more death."""
        record = cls(path)
        try:
            with open(path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return record
        except (OSError, ValueError):
            log.warning("ignoring an unreadable in-flight record %s", path, exc_info=True)
            return record
        record.deaths = {image_id: Deaths(**counts) for image_id, counts in saved["deaths"].items()}
        in_hand = saved["in_hand"]
        for image_id in in_hand:
            deaths = record.deaths.setdefault(image_id, Deaths())
            if len(in_hand) == 1:
                deaths.alone += 1
            else:
                deaths.with_others += 1
        if in_hand:
            log.warning(
                "the previous process of this actor or task died with %d image(s) in hand (%s); "
                "they are now worked on one at a time",
                len(in_hand),
                ", ".join(in_hand[:5]) + (", …" if len(in_hand) > 5 else ""),
            )
        record._save([])
        return record

    def suspects(self, image_ids: list[str]) -> bool:
        """Whether any of these images was in hand when a process died."""
        return any(image_id in self.deaths for image_id in image_ids)

    def given_up(self, image_id: str) -> Deaths | None:
        """The image's deaths if it killed its process too often to be tried again."""
        deaths = self.deaths.get(image_id)
        return deaths if deaths is not None and deaths.alone >= MAX_DEATHS_ALONE else None

    @staticmethod
    def given_up_reason(deaths: Deaths) -> str:
        """The error of an image given up on."""
        return (
            f"the worker process died {deaths.alone} times while working on this image alone "
            "(out of memory, or a crash in native code); not tried again"
        )

    def hold(self, image_ids: list[str]) -> None:
        """Records these images as in hand, before any work on them starts."""
        self._save(image_ids)

    def release(self, image_ids: list[str]) -> None:
        """These images are done (a row each): they leave the record."""
        for image_id in image_ids:
            self.deaths.pop(image_id, None)
        self._save([])

    def _save(self, in_hand: list[str]) -> None:
        if not in_hand and not self.deaths:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        # Written whole then renamed: a process killed mid-write leaves the previous record.
        partial = f"{self.path}.partial"
        with open(partial, "w") as f:
            json.dump(
                {"in_hand": in_hand, "deaths": {k: vars(v) for k, v in self.deaths.items()}},
                f,
            )
        os.replace(partial, self.path)
