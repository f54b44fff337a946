"""Rows grouped by their owner (the task or expert each is routed to) and padded to ``(G, R, ...)``,
so that one batched operation serves every owner: a batch spread over many experts costs about
what one expert's batch costs, not one dispatch per expert (the grouped-GEMM idea of S-LoRA and
Punica, in plain batched matrix products).

Padding wastes work when group sizes differ; :meth:`Groups.parts` splits the groups, largest
first, into parts whose padded size stays within twice their rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Groups:
    """Entries (source rows) sorted by owner: entry ``i`` is row ``rows[i]``, at ``slot[i]`` of
    group ``group[i]``, whose owner is ``owners[group[i]]``; ``width`` is the largest group."""

    rows: torch.Tensor     # (N,)
    owners: torch.Tensor   # (G,)
    counts: torch.Tensor   # (G,)
    group: torch.Tensor    # (N,)
    slot: torch.Tensor     # (N,)
    width: int
    index: torch.Tensor    # (G, width): the source row at each padded place

    @classmethod
    def of(cls, owner: torch.Tensor, rows: torch.Tensor | None = None) -> "Groups":
        """Group entries by ``owner`` ``(N,)`` (integers); ``rows`` defaults to ``arange(N)``."""
        rows = torch.arange(len(owner)) if rows is None else rows
        order = torch.argsort(owner, stable=True)
        owners, counts = torch.unique_consecutive(owner[order], return_counts=True)
        return cls._make(rows[order], owners, counts)

    @classmethod
    def _make(cls, rows: torch.Tensor, owners: torch.Tensor, counts: torch.Tensor) -> "Groups":
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(len(owners)), counts)
        slot = torch.arange(len(rows)) - starts[group]
        width = int(counts.max()) if len(counts) else 0
        index = rows[starts][:, None].repeat(1, width)
        index[group, slot] = rows
        return cls(rows, owners, counts, group, slot, width, index)

    def parts(self) -> list["Groups"]:
        """The groups split, largest first, into parts whose padded size (groups x width) is at
        most twice their entries: uniform groups stay one part, one big group and many small ones
        become two."""
        sizes = self.counts.tolist()
        part_of, part, first, n, rows = [0] * len(sizes), 0, 0, 0, 0
        for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
            if n and (n + 1) * first > 2 * (rows + sizes[g]):
                part, n, rows = part + 1, 0, 0
            if not n:
                first = sizes[g]
            part_of[g], n, rows = part, n + 1, rows + sizes[g]
        if not part:
            return [self]
        of_group = torch.tensor(part_of)
        of_entry = of_group[self.group]
        out = []
        for q in range(part + 1):
            groups, entries = (of_group == q).nonzero()[:, 0], (of_entry == q).nonzero()[:, 0]
            out.append(Groups._make(self.rows[entries], self.owners[groups], self.counts[groups]))
        return out

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (indexed by source row) as ``(G, width, ...)``: each group's rows first, then
        copies of its first row (work whose results :meth:`take` never reads)."""
        return x[self.index]

    def take(self, y: torch.Tensor) -> torch.Tensor:
        """The entries of a padded ``(G, width, ...)`` result, in entry order (see ``rows``)."""
        return y[self.group, self.slot]


def pad_stack(tensors: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    """Tensors of shapes ``(n_i, ...)`` stacked as ``(len, max n_i, ...)``, ``fill`` after each."""
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=fill)
