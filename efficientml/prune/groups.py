"""Channel groups: the sets of coupled channels a finished channel trace describes.

:mod:`efficientml.prune.graph` follows channel ids through a model (a union-find in
:class:`~efficientml.core.channels.ChannelIds`); :func:`build_groups` turns the result into
:class:`ChannelGroup` objects, one per set of channels that share a producing layer, ordered so that
"keep the first k" keeps each producer's first k channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from efficientml.core.channels import ChannelIds, Member


@dataclass
class ChannelGroup:
    """Channels that share layers. ``channels[i]`` lists the members of channel i (one channel id).

    ``partition[i]`` labels channels that live in exactly the same layers; ratios are applied per
    partition so a residual stream loses the same share of its stage-1, stage-2 and stage-3 channels.
    """

    id: int
    channels: list[list[Member]]
    frozen: list[bool]
    partition: list[int]

    @property
    def producers(self) -> list[str]:
        return sorted({m.module for ch in self.channels for m in ch if m.role == "out"})

    @property
    def consumers(self) -> list[str]:
        return sorted({m.module for ch in self.channels for m in ch if m.role == "in"})

    @property
    def name(self) -> str:
        prods = self.producers
        return prods[0] if prods else f"group{self.id}"

    @property
    def prunable(self) -> int:
        return sum(not f for f in self.frozen)

    def __len__(self) -> int:
        return len(self.channels)


def build_groups(ids: ChannelIds) -> list[ChannelGroup]:
    """The channel groups of a finished trace: ids that share an output layer form one group."""
    find = ids.find
    members: dict[int, set[Member]] = {}
    for cid, ms in ids.members.items():
        members.setdefault(find(cid), set()).update(ms)
    frozen_roots = {find(c) for c in ids.frozen}
    # channels that share an output layer belong to one group (union-find over roots)
    parent: dict[int, int] = {r: r for r in members}

    def gfind(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_out: dict[str, int] = {}
    for r, ms in members.items():
        for m in ms:
            if m.role == "out":
                if m.module in by_out:
                    ra, rb = gfind(by_out[m.module]), gfind(r)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
                else:
                    by_out[m.module] = r
    grouped: dict[int, list[int]] = {}
    for r in sorted(members):
        grouped.setdefault(gfind(r), []).append(r)
    out: list[ChannelGroup] = []
    for roots in grouped.values():
        chans = [sorted(members[r], key=lambda m: (m.module, m.role, m.index)) for r in roots]
        if not any(m.role == "out" for ch in chans for m in ch):
            continue
        sigs: dict[frozenset, int] = {}
        part = [sigs.setdefault(frozenset(m.module for m in ch if m.role == "out"), len(sigs))
                for ch in chans]
        # order channels by their first producer's index so "keep the first k" means what it says
        order = sorted(range(len(roots)), key=lambda i: _first_out(chans[i]))
        out.append(ChannelGroup(len(out), [chans[i] for i in order],
                                [roots[i] in frozen_roots for i in order], [part[i] for i in order]))
    return out


def _first_out(ch: list[Member]) -> tuple[str, int]:
    outs = [(m.module, m.index) for m in ch if m.role == "out"]
    return min(outs) if outs else ("", 0)

