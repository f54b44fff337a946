"""The zoo: one frozen backbone, one expert per task, a router over them.

``Zoo.create(dir)``, ``Zoo.open(dir)``, ``zoo.add_task(...)``, ``zoo.predict(...)``,
``zoo.evaluate(...)``, ``zoo.verify()``, ``zoo.remove(name)``: the CLI is a thin layer over these.
Each concern lives in its own module: the directory in :mod:`clipzoo.zoo.store`, its commits in
:mod:`clipzoo.zoo.commit`, training in :mod:`clipzoo.zoo.learn`, answering in
:mod:`clipzoo.zoo.predict`, the Hub in :mod:`clipzoo.zoo.hub`.
"""

from __future__ import annotations

from pathlib import Path

from clipzoo.zoo import hub
from clipzoo.zoo.learn import Learner
from clipzoo.zoo.predict import Predictor
from clipzoo.zoo.store import Store


class Zoo(Store, Learner, Predictor):
    """A zoo directory that trains new experts and answers with them."""

    def __init__(self, root: Path, reg: dict):
        Store.__init__(self, root, reg)
        Predictor.__init__(self)

    def push_to_hub(self, repo_id: str, **kwargs) -> dict:
        """Upload this zoo in one commit; ``kwargs``: revision, private, message, dry_run, endpoint, token."""
        return hub.push(self.root, repo_id, **kwargs)

    @classmethod
    def from_hub(cls, repo_id: str, root: str | Path, **kwargs) -> "Zoo":
        """Pull ``repo_id`` into the zoo at ``root`` (created if absent) and open it; ``kwargs``:
        revision, only, force, endpoint, token."""
        hub.pull(Path(root), repo_id, **kwargs)
        return cls.open(root)
