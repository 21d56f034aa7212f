"""Which rows of a rank's batch go into which micro-batch, at which widths.

Fixed (`max_tokens` 0, `--micro_batch_size`): consecutive slices of `micro_batch` rows at the
batch's full width [P + C]. Budgeted (`--max_tokens_per_micro_batch=N`): the rows sorted by length
(prompt_len + completion_len) and cut greedily so that each micro-batch's padded size,
rows x (its longest prompt + its longest completion), stays within N; a single row over N is a
micro-batch of its own. Auto (`max_tokens` -1, the trainer's default): budgeted with the fixed
slices' own size, N = micro_batch x (P + C): the same peak, at most as many micro-batches (each
holds at least micro_batch rows), and when every row fills the batch's widths, the fixed slices.

Inside a micro-batch the rows go back to batch order: a group's rows are consecutive in the batch,
so those that share a micro-batch sit next to each other and share one prompt pass
(algo/logprobs.py runs each run of equal prompts once); the order changes no width and no padding.
Each micro-batch is trimmed to its own widths: the first C' completion columns (right padding) and
the last P' prompt columns (left padding keeps its layout), so a row pays for the longest row of its
micro-batch instead of the longest of the batch.

Every [B, ...] tensor of the batch follows the rows through `MicroBatch.take`; outputs computed per
micro-batch come back to the batch's row order and width through `scatter`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    rows: torch.Tensor  # [b] long: row indices into the batch
    P: int  # prompt columns kept: the batch's last P
    C: int  # completion columns kept: the batch's first C

    @property
    def positions(self) -> int:
        """Positions one pass over this micro-batch runs: rows x (P + C)."""
        return len(self.rows) * (self.P + self.C)

    def take(self, x: torch.Tensor | None, device=None) -> torch.Tensor | None:
        """`x`'s rows of this micro-batch ([B] -> [b]; [B, C] -> [b, self.C]), on `device`."""
        if x is None:
            return None
        x = x[self.rows]
        if x.dim() > 1:
            x = x[:, :self.C]
        return x if device is None else x.to(device)

    def inputs(self, batch, device):
        """completion_logprobs' (prompt_ids, prompt_lens, completion_ids, completion_lens)."""
        return (batch.prompt_ids[self.rows][:, batch.prompt_ids.shape[1] - self.P:].to(device),
                batch.prompt_lens[self.rows].to(device), self.take(batch.completion_ids, device),
                batch.completion_lens[self.rows].to(device))


def _trimmed(rows: torch.Tensor, prompt_lens_B, completion_lens_B, P: int, C: int) -> MicroBatch:
    p = min(P, max(1, int(prompt_lens_B[rows].max())))
    c = min(C, max(1, int(completion_lens_B[rows].max())))
    return MicroBatch(rows, p, c)


def plan(batch, *, micro_batch: int, max_tokens: int = 0) -> list[MicroBatch]:
    """The micro-batches of `batch` (module docstring): fixed slices when `max_tokens` is 0, the
    fixed slices' budget when it is -1."""
    B, P = batch.prompt_ids.shape
    C = batch.completion_ids.shape[1]
    if max_tokens < 0:
        max_tokens = micro_batch * (P + C)
    if max_tokens == 0:
        assert B % micro_batch == 0, f"batch of {B} does not split into micro-batches of {micro_batch}"
        return [MicroBatch(torch.arange(s, s + micro_batch), P, C) for s in range(0, B, micro_batch)]
    p_B, c_B = batch.prompt_lens.cpu().long(), batch.completion_lens.cpu().long()
    order = torch.sort(p_B + c_B, stable=True).indices.tolist()
    out, rows, p, c = [], [], 0, 0
    for i in order:
        pi, ci = min(P, max(1, int(p_B[i]))), min(C, max(1, int(c_B[i])))
        if rows and (len(rows) + 1) * (max(p, pi) + max(c, ci)) > max_tokens:
            out.append(MicroBatch(torch.tensor(sorted(rows)), p, c))
            rows, p, c = [], 0, 0
        rows.append(i)
        p, c = max(p, pi), max(c, ci)
    if rows:
        out.append(MicroBatch(torch.tensor(sorted(rows)), p, c))
    return out


def filler(batch) -> MicroBatch:
    """The batch's shortest row as a micro-batch: the cheapest pass a rank can run when it needs a
    zero-loss backward to keep step with ranks that have more micro-batches."""
    rows = torch.sort(batch.prompt_lens.cpu() + batch.completion_lens.cpu(), stable=True).indices[:1]
    return _trimmed(rows, batch.prompt_lens.cpu(), batch.completion_lens.cpu(), batch.prompt_ids.shape[1],
                    batch.completion_ids.shape[1])


def real_positions(mb: MicroBatch, batch) -> int:
    """Positions of `mb` that are real tokens (prompt + completion), not padding."""
    return int((batch.prompt_lens[mb.rows].clamp(max=mb.P) + batch.completion_lens[mb.rows].clamp(max=mb.C)).sum())


def scatter(parts: list[tuple[MicroBatch, torch.Tensor]], B: int, C: int) -> torch.Tensor:
    """Per-micro-batch [b, c] results back into one [B, C] float32 tensor in the batch's row order
    (zeros beyond each micro-batch's width)."""
    out = torch.zeros(B, C, dtype=torch.float32)
    for mb, x in parts:
        out[mb.rows, :x.shape[1]] = x.float().cpu()
    return out
