"""Packed batches: rows of several documents, no padding between them, attention inside each document.

A padded micro-batch costs (rows × its longest row) tokens; with UltraFeedback's spread of response
lengths most of that is padding. Here each example becomes one document (a pair with the prompt
once: [prompt, chosen, rejected], TRL's padding_free and OpenRLHF's --packing_samples without the
second prompt), documents are laid first-fit-decreasing into rows as wide as the longest one, and
micro-batches are formed by a token budget instead of a row count. Positions restart per document
(a rejected continuation restarts at the prompt's length), and the model attends within a
document's branch only (mt/model.py segment_mask), so every log-prob and reward equals the padded
path's (tests/test_packing.py, float64).

The loss normalisation is untouched: it is the global count of pairs or tokens known before the
step (mt/train.py), whatever the micro-batches are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mt.chat import Example
from mt.logps import packed_logps

SHARED, CHOSEN, REJECTED = 0, 1, 2  # branches: a query sees keys of SHARED and of its own branch


@dataclass
class Packed:
    """One packed micro-batch. Sequences s = 0..n-1 are ordered as mt/train.py collate orders its
    rows: chosen rows, then rejected rows (pairwise), or the b rows (SFT)."""
    ids: torch.Tensor  # (R, W) documents left to right, padding at the end of a row
    positions: torch.Tensor  # (R, W) per document, from 0; a rejected branch from the prompt's length
    doc: torch.Tensor  # (R, W) document id, -1 on padding
    branch: torch.Tensor  # (R, W) SHARED | CHOSEN | REJECTED
    pred: torch.Tensor  # (M,) flat index of the position that predicts each response token
    targets: torch.Tensor  # (M,) that token
    owner: torch.Tensor  # (M,) its sequence
    last: torch.Tensor  # (n,) flat index of each sequence's last token (the RM reads its score there)
    n: int  # sequences
    tokens: int  # real tokens computed (the shared prompt once)
    ref_chosen: torch.Tensor | None = None  # (b,) summed reference log-probs
    ref_rejected: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        """Positions computed, padding included."""
        return self.ids.numel()

    def forward_args(self) -> dict:
        return {"positions": self.positions, "segments": (self.doc, self.branch)}

    def logps(self, model, average: bool = False, full_logits: bool = False) -> torch.Tensor:
        """Summed (or averaged) response log-probs per sequence (n,), as Batch.logps gives them."""
        return packed_logps(model, self.ids, self.pred, self.targets, self.owner, self.n, average,
                            full_logits, **self.forward_args())

    def rewards(self, model) -> torch.Tensor:
        """The score head at each sequence's last token (n,)."""
        return model(self.ids, **self.forward_args()).reshape(-1).index_select(0, self.last)


def shared_prefix(e: Example) -> int:
    """Tokens the pair's two sequences share at the start, leaving each at least its last token
    (the one the RM reads, and a branch of its own)."""
    c, r = e.chosen, e.rejected
    n = 0
    while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
        n += 1
    return n


def doc_tokens(e: Example, pairwise: bool, share_prompt: bool) -> list[int]:
    """Token counts of the documents an example becomes."""
    if not pairwise:
        return [len(e.chosen)]
    if share_prompt:
        return [len(e.chosen) + len(e.rejected) - shared_prefix(e)]
    return [len(e.chosen), len(e.rejected)]


def _documents(examples, pairwise, share_prompt):
    """Each document as (tokens, positions, branches, [(sequence, where, start, seq tokens)]):
    `where[i]` is the document index of the sequence's token i."""
    n = len(examples)
    docs = []
    for j, e in enumerate(examples):
        c, r = list(e.chosen), list(e.rejected)
        if not pairwise or not share_prompt:
            seqs = [(j, c, e.chosen_start)] + ([(j + n, r, e.rejected_start)] if pairwise else [])
            for s, seq, start in seqs:
                idx = list(range(len(seq)))
                docs.append((seq, idx, [SHARED] * len(seq), [(s, idx, start, seq)]))
            continue
        p = shared_prefix(e)
        rest = len(r) - p
        docs.append((c + r[p:], list(range(len(c))) + list(range(p, len(r))),
                     [SHARED] * p + [CHOSEN] * (len(c) - p) + [REJECTED] * rest,
                     [(j, list(range(len(c))), e.chosen_start, c),
                      (j + n, list(range(p)) + list(range(len(c), len(c) + rest)),
                       e.rejected_start, r)]))
    return docs


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` into bins of at most `capacity` (an item over it alone in its bin),
    largest first; bins in order of creation."""
    bins, room = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for b in range(len(bins)):
            if sizes[i] <= room[b]:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def pack(examples: list[Example], pairwise: bool, share_prompt: bool = True, pad_id: int = 0,
         device="cpu", refs: dict[str, tuple[float, float]] | None = None,
         one_row: bool = False, align: int = 1) -> Packed:
    """Lay the examples' documents into rows (first fit decreasing) as wide as the longest
    document, or all into one row with `one_row`; the width rounded up to `align`."""
    docs = _documents(examples, pairwise, share_prompt)
    W = sum(len(d[0]) for d in docs) if one_row else max(len(d[0]) for d in docs)
    W = -(-W // align) * align
    rows = first_fit_decreasing([len(d[0]) for d in docs], W)
    ids, pos = torch.full((len(rows), W), pad_id), torch.zeros(len(rows), W, dtype=torch.long)
    doc = torch.full((len(rows), W), -1)
    branch = torch.zeros(len(rows), W, dtype=torch.long)
    n = len(examples) * (2 if pairwise else 1)
    pred, targets, owner, last = [], [], [], [0] * n
    for row, members in enumerate(rows):
        off = 0
        for k in members:
            tokens, positions, branches, seqs = docs[k]
            L = len(tokens)
            ids[row, off:off + L] = torch.tensor(tokens)
            pos[row, off:off + L] = torch.tensor(positions)
            doc[row, off:off + L] = k
            branch[row, off:off + L] = torch.tensor(branches)
            base = row * W + off
            for s, where, start, seq in seqs:
                # token i is predicted by the sequence's token i-1 (token 0 never is a target)
                for i in range(max(start, 1), len(seq)):
                    pred.append(base + where[i - 1])
                    targets.append(seq[i])
                    owner.append(s)
                last[s] = base + where[-1]
            off += L
    rc = rr = None
    if refs is not None:
        rc = torch.tensor([refs[e.key][0] for e in examples], dtype=torch.float32, device=device)
        rr = torch.tensor([refs[e.key][1] for e in examples], dtype=torch.float32, device=device)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Packed(ids.to(device), pos.to(device), doc.to(device), branch.to(device), t(pred),
                  t(targets), t(owner), t(last), n, sum(len(d[0]) for d in docs), rc, rr)


def micro_batches(batch: list[int], docs: list[list[int]], rank: int, world: int,
                  budget: int) -> list[list[int]]:
    """This rank's share of a global batch (batch[rank::world], as the padded path shares it) in
    micro-batches of at most `budget` tokens (an example over it alone); `docs[i]` are the token
    counts of example i's documents. The SAME number of micro-batches on every rank: FSDP runs
    collectives in every forward, so a rank with fewer runs empty ones (zero-weight forwards in
    mt/train.py). Every rank computes every rank's packing from host data: no communication."""
    groups = [_rows_first(batch[r::world], docs, budget) for r in range(world)]
    k = max(1, max(len(g) for g in groups))
    return groups[rank] + [[] for _ in range(k - len(groups[rank]))]


def _rows_first(share: list[int], docs: list[list[int]], budget: int) -> list[list[int]]:
    """Micro-batches of a share, each `budget // W` rows of width W = the largest remaining
    document, filled first fit decreasing from ALL the remaining examples (an example only with
    all its documents): rows like those pack() lays out, filled from the whole share rather than
    from a few examples picked beforehand (on UltraFeedback-like lengths, 3 % padding instead of
    10 % at the paper's batch and micro-batch)."""
    left = sorted(share, key=lambda i: -max(docs[i]))
    out = []
    while left:
        W = max(docs[left[0]])
        room = [W] * max(len(docs[left[0]]), budget // W)  # the largest example always fits
        taken, rest = [], []
        for i in left:
            trial = list(room)
            for n in sorted(docs[i], reverse=True):
                b = next((b for b, r in enumerate(trial) if n <= r), None)
                if b is None:
                    break
                trial[b] -= n
            else:
                room = trial
                taken.append(i)
                continue
            rest.append(i)
        out.append(taken)
        left = rest
    return out


class Packing:
    """The packed layout of a stage: micro-batches by a token budget, packed batches.

    `budget` 0 = `micro_batch_size` × the largest example's documents: never more tokens than a
    padded micro-batch of the same rows could hold, so a `micro_batch_size` sized for memory stays
    safe. Rows: on CUDA one row per micro-batch, rounded up to FlexAttention's 128-position blocks
    (its block mask skips the blocks between documents, so one long row costs what the documents
    cost, with no row padding and few distinct shapes to compile); elsewhere rows as wide as the
    longest document (SDPA's dense mask costs rows × width², so one long row would cost the square
    of the budget)."""

    def __init__(self, examples: list[Example], pairwise: bool, share_prompt: bool,
                 micro_batch_size: int, budget: int = 0, pad_id: int = 0, device="cpu",
                 refs=None):
        self.pairwise, self.share, self.pad_id, self.device, self.refs = (
            pairwise, share_prompt, pad_id, torch.device(device), refs)
        self.docs = [doc_tokens(e, pairwise, share_prompt) for e in examples]
        self.budget = budget or micro_batch_size * max(sum(d) for d in self.docs)

    def micro(self, batch: list[int], rank: int, world: int) -> list[list[int]]:
        return micro_batches(batch, self.docs, rank, world, self.budget)

    def batch(self, examples: list[Example]) -> Packed:
        cuda = self.device.type == "cuda"
        return pack(examples, self.pairwise, self.share, self.pad_id, self.device, self.refs,
                    one_row=cuda, align=128 if cuda else 1)
